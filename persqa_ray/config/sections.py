"""The config sections other than the engine: input, image, prompt, output, ray, run.

Every field has a description (``persqa-ray validate --explain`` prints them); unknown keys are
refused (``_Section``).
"""
from __future__ import annotations

import string
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from persqa_ray.schema import IMAGE_FORMATS

# Columns of the output row that users may partition by (low-cardinality ones).
PARTITIONABLE_COLUMNS = ("status", "concept", "tag", "subject_type", "model", "template_id", "language",
                         "qa_type", "image_concept")
SubjectType = Literal["person", "animal", "object"]


def _check_tag_name(v: str) -> str:
    if not v or not all(c.isalnum() or c in "_-" for c in v):
        raise ValueError("must be a bare name of letters, digits, '_' or '-' (rendered as '<name>')")
    return v


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
        "'<value>'). Unset or empty value: the concept prompt.tag. A list of names: a multi-concept image "
        "(questions of the multi family).")
    concepts_table: Optional[str] = Field(
        None, description="A Parquet or JSONL file of concepts, one per row: concept (the name), and optionally "
        "tag, class_phrase, subject_type, reference_images (paths or URLs, relative to the table's directory), "
        "info. For registries of thousands of concepts; prompt.concepts entries win over its rows.")
    embedding_column: Optional[str] = Field(
        None, description="Column with an embedding per row (a list of floats, e.g. from CLIP): averaged per "
        "concept by the concept pass, it ranks other concepts by cosine similarity for "
        "prompt.recognition_negatives: similar.")
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
    reference_images: list[str] = Field(
        default_factory=list, description="Reference images of the concept (paths relative to the current "
        "directory, or URLs), read under input.allowed_roots: shown in the prompt "
        "(prompt.reference_images_in_prompt), looked at for text-only QA, listed in the RAP export.")
    info: Optional[str] = Field(None, description="A description of the concept (RAP's database 'info').")

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
    recognition_negatives: Optional[Literal["random", "same_type", "similar"]] = Field(
        None, description="Which concept a 'No' recognition pair asks about: 'same_type' (another concept with "
        "the same class phrase first, then the same subject type: another cat for <chelsea>), 'similar' (the "
        "most similar concepts by input.embedding_column), 'random'. Unset: same_type when subject types are "
        "known, else random. Each 'No' row records negative_concept and negative_kind.")
    reference_images_in_prompt: bool = Field(
        False, description="Show each concept's reference images before the query image (\"This is <tag>.\"), as "
        "RAP does; they count against engine.max_images_per_prompt.")
    max_reference_images: int = Field(
        2, ge=1, description="Most reference images shown in one request (spread over a multi-concept row's "
        "concepts).")
    text_qa_per_concept: int = Field(
        0, ge=0, le=16, description="Text-only questions per concept about its stable attributes, answered by "
        "the VLM looking at the concept's reference images, written as qa_type 'text' rows with no image "
        "(Yo'LLaVA's text QA). Concepts with no reference image are skipped (a warning).")
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
        "another, each driven from a Ray worker of its own that exits after it: Ray keeps some memory per "
        "block in the process that drives an execution, so neither the driver nor any process grows with the "
        "dataset. Each window starts its engines anew (~30 s on CPU, 1-2 min on a GPU). 0: one execution.")
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


