"""The plan: everything resolved and checked on the driver before any work starts.

`plan()` lists the input (refusing output paths that could swallow or destroy it), resolves the
allowed image roots and the model, and builds each stage's options from the config; a problem
is a ConfigError naming the field. Nothing here starts Ray or an engine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

from persqa_ray.config import ConfigError, PersQAConfig, load_config
from persqa_ray.io.filesystems import Shard, is_url, list_shards, normalize_url, parent_of, under_root
from persqa_ray.io.outputs import check_output_location, without_outputs
from persqa_ray.io.readers import ReadOptions
from persqa_ray.personalization.concept_table import ConceptTableError
from persqa_ray.personalization.options import PersonalizationOptions
from persqa_ray.personalization.templates import TemplateError
from persqa_ray.pipeline.concepts import tag_problems
from persqa_ray.stages.decode import DecodeOptions
from persqa_ray.stages.generate import GenerateOptions


@dataclass
class Plan:
    config: PersQAConfig
    shards: list[Shard]
    read: ReadOptions
    personalization: PersonalizationOptions
    decode: DecodeOptions
    generate: GenerateOptions
    warnings: list[str] = field(default_factory=list)  # shown to the user and kept in _summary.json


def plan(config: Union[PersQAConfig, dict, str], shards: Optional[list] = None) -> Plan:
    """Validate everything that can be checked before starting work; raises ConfigError.

    `shards`: already known (path, format) pairs (the DataFlow face reads its own file);
    otherwise input.path is listed.
    """
    cfg = load_config(config)
    shards = [Shard(*s) for s in shards] if shards is not None else _input_shards(cfg)
    cwd = os.getcwd()
    try:
        pers = PersonalizationOptions.from_config(cfg)
    except ConceptTableError as e:
        raise ConfigError(f"input.concepts_table: {e}") from None
    try:
        templates = pers.templates()
    except TemplateError as e:
        raise ConfigError(f"prompt.templates: {e}") from None
    if pers.text_qa_per_concept and not templates.text:
        raise ConfigError("prompt.text_qa_per_concept: the template file has no 'text' questions")
    roots = _roots(cfg, shards, cwd)
    _check_references(pers, roots)
    cfg = cfg.model_copy(update={"engine": cfg.engine.resolved()})
    warnings = []
    for name, problem in tag_problems(cfg, [cfg.prompt.tag] + [c.name for c in pers.registry.registered]):
        where = f"prompt.concepts.{name}" if name in cfg.prompt.concepts else "prompt.tag"
        if cfg.prompt.tag_vocab_check == "error":
            raise ConfigError(f"{where}: {problem} (prompt.tag_vocab_check: error)")
        warnings.append(f"{where}: {problem}")
    return Plan(config=cfg, shards=shards, read=ReadOptions.from_config(cfg, cwd), personalization=pers,
                decode=DecodeOptions.from_config(cfg, roots),
                generate=GenerateOptions.from_config(cfg, templates), warnings=warnings)


def _input_shards(cfg: PersQAConfig) -> list[Shard]:
    try:
        shards = list_shards(cfg.input.path, cfg.input.format, cfg.input.storage_options)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - unreachable bucket, bad credentials, ...
        raise ConfigError(f"input.path: cannot list {cfg.input.path} ({type(e).__name__}: {e})") from None
    check_output_location(cfg.output.path, cfg.input.path, shards, cfg.output.overwrite)
    shards = without_outputs(shards, cfg.output.path)
    if not shards:
        raise ConfigError(f"input.path: {cfg.input.path} holds no shard outside output.path")
    return shards


def _roots(cfg: PersQAConfig, shards: list[Shard], cwd: str) -> tuple[str, ...]:
    """input.allowed_roots, or by default the input's own directories or bucket prefixes."""
    roots = cfg.input.allowed_roots
    if roots is None:
        roots = sorted({parent_of(s.path) for s in shards})
        if cfg.input.paths_relative_to == "cwd":
            roots.append(cwd)
        if cfg.input.concepts_table:  # an input too: its reference images are read
            table = cfg.input.concepts_table
            roots.append(parent_of(table if is_url(table) else os.path.abspath(os.path.expanduser(table))))
    return tuple(normalize_url(r) if is_url(r) else os.path.abspath(os.path.expanduser(r)) for r in roots)


def _check_references(pers: PersonalizationOptions, roots: tuple[str, ...]) -> None:
    """Reference images are read under the same roots as inputs: one outside them is refused
    before work starts, naming the concept (whether it can be decoded is known only at run time)."""
    if not (pers.reference_images_in_prompt or pers.text_qa_per_concept):
        return
    local = tuple(os.path.realpath(r) for r in roots if not is_url(r))
    urls = tuple(r for r in roots if is_url(r))
    for c in pers.registry.registered:
        for ref in c.reference_images:
            inside = under_root(normalize_url(ref), urls) if is_url(ref) else any(
                os.path.realpath(ref) == r or os.path.realpath(ref).startswith(r.rstrip(os.sep) + os.sep)
                for r in local)
            if not inside:
                raise ConfigError(f"concept {c.name!r}: reference image {ref} is outside input.allowed_roots "
                                  f"({', '.join(roots)}); add its directory there")
