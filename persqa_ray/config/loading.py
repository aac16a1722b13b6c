"""Loading a config (YAML file, dict, or config, plus `--set a.b=c` overrides), printing it with
credentials masked, and describing every field (the config reference)."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from persqa_ray.config.engines import ENGINE_KINDS, _EngineBase
from persqa_ray.config.errors import ConfigError
from persqa_ray.config.root import PersQAConfig


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', yaml value of c): ints, floats, bools, lists parse as in the YAML file."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    if not raw.strip():
        return key.strip(), ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return key.strip(), raw
    # "Q: {question}" is a YAML mapping, but nobody means a mapping without braces: keep the text.
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        return key.strip(), raw
    return key.strip(), value


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        kind = loc.pop(1) if len(loc) > 2 and loc[0] == "engine" and loc[1] in ENGINE_KINDS else None
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field" + (f" for engine.kind '{kind}'" if kind else "")
        elif e["type"] == "union_tag_invalid":
            loc.append(e["ctx"]["discriminator"].strip("'"))
            msg = f"must be one of {e['ctx']['expected_tags']} (got {e['ctx']['tag']!r})"
        if not loc and re.match(r"^[a-z_]+\.[a-z_.]+: ", msg):
            lines.append(msg)  # a cross-section check names its own field
        else:
            lines.append(f"{'.'.join(loc) or 'config'}: {msg}")
    return "; ".join(lines)


def load_config(source: Union[str, Path, dict, PersQAConfig], overrides: list[str] = ()) -> PersQAConfig:
    """Build a validated config from a YAML file, a dict or a config, plus 'a.b=c' overrides."""
    if isinstance(source, PersQAConfig):
        if not overrides:
            return source
        tree = source.model_dump(mode="json", exclude_unset=True)  # an override may change engine.kind
    elif isinstance(source, dict):
        tree = copy.deepcopy(source)
    else:
        p = Path(source)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    try:
        return PersQAConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


# Sub-trees whose values are all treated as credentials when a config is printed or written, and
# key names that mark a credential anywhere else (a name ending in _env is a variable's name).
_SECRET_TREES = ("storage_options", "env", "engine_kwargs")
_SECRET_KEY = re.compile(r"(^|_)(api_?key|key|secret|token|password|passwd|credentials?|auth)($|_)", re.I)


def masked(tree: Any, secret: bool = False) -> Any:
    """A config tree (model_dump) with every value that could be a credential replaced by '***':
    all values under storage_options, env and engine_kwargs (keys kept), and any value whose key
    looks like a credential (`secret_key`, `session_token`, ...). For every printed copy."""
    if isinstance(tree, dict):
        return {k: masked(v, secret or k in _SECRET_TREES
                          or (bool(_SECRET_KEY.search(str(k))) and not str(k).endswith("_env")))
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [masked(v, secret) for v in tree]
    return "***" if secret and tree is not None else tree


def describe_fields(model: type[BaseModel] = PersQAConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every field: the config reference in the README.
    The engine's fields are listed once each, those of one kind only marked with it."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if name == "engine" and model is PersQAConfig:
            rows += _engine_fields(f"{prefix}{name}.")
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_fields(ann, f"{prefix}{name}.")
            continue
        rows.append((f"{prefix}{name}", _default(f), f.description or ""))
    return rows


def _default(f) -> str:
    return "required" if f.is_required() else repr(f.get_default(call_default_factory=True))


def _engine_fields(prefix: str) -> list[tuple[str, str, str]]:
    shared = set(_EngineBase.model_fields)
    rows = [(f"{prefix}{n}", _default(f), f.description or "") for n, f in _EngineBase.model_fields.items()]
    rows.insert(0, (f"{prefix}kind", "'vllm'", "Inference engine: 'vllm' (in-process vLLM in each actor), "
                    "'openai' (an OpenAI-compatible server, from CPU actors) or 'standin' (benchmark instrument: "
                    "fixed text, no model). Each kind has the fields below marked with it."))
    for kind, cls in ENGINE_KINDS.items():
        rows += [(f"{prefix}{n}", _default(f), f"({kind}) {f.description or ''}")
                 for n, f in cls.model_fields.items() if n not in shared and n != "kind"]
    return rows
