"""Composes the stages on Ray Data. The only module that knows their order:

    shard list -> read+normalize (tasks) -> build requests (tasks, fused with the read)
      -> decode (CPU actor pool) -> generate + validate (engine actor pool) -> write Parquet
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import ray

from persqa_ray import schema
from persqa_ray.config import ConfigError, PersQAConfig, load_config
from persqa_ray.engines.base import EngineSpec
from persqa_ray.io.filesystems import Shard, is_url, list_shards, normalize_url, parent_of
from persqa_ray.io.commits import WriteOptions, write_committed
from persqa_ray.io.duplicate_ids import find_duplicate_ids, remove_work
from persqa_ray.io.outputs import check_output_location, open_output, without_outputs
from persqa_ray.io.readers import ReadOptions, concept_values_batch, read_shards_batch
from persqa_ray.io.resume import ResumeOptions
from persqa_ray.io.summary import summarize, write_summary
from persqa_ray.pipeline.windows import Windows
from persqa_ray.personalization.concepts import Concept, ConceptRegistry, load_tokenizer, vocab_collision
from persqa_ray.personalization.templates import TemplateError
from persqa_ray.stages.decode import DecodeOptions, DecodeStage
from persqa_ray.stages.generate import AsyncGenerateStage, GenerateOptions, GenerateStage
from persqa_ray.stages.requests import RequestOptions, build_requests
from persqa_ray.stats import RunStats
from persqa_ray.versions import check_ray

log = logging.getLogger("persqa_ray")


@dataclass
class Plan:
    """Everything resolved on the driver before any work starts."""
    config: PersQAConfig
    shards: list[tuple[str, str]]
    read: ReadOptions
    requests: RequestOptions
    decode: DecodeOptions
    generate: GenerateOptions
    warnings: list[str] = field(default_factory=list)  # shown to the user and kept in _summary.json


def _pool(concurrency, in_flight: int | None = None) -> ray.data.ActorPoolStrategy:
    # in_flight: blocks one (async) actor works on at once; Ray runs one call per actor otherwise.
    extra = {} if not in_flight else {"max_tasks_in_flight_per_actor": in_flight,
                                      "max_concurrent_calls_per_actor": in_flight}
    if isinstance(concurrency, (tuple, list)):
        lo, hi = concurrency
        return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, **extra)
    return ray.data.ActorPoolStrategy(size=int(concurrency), **extra)


def engine_spec(cfg: PersQAConfig) -> EngineSpec:
    e = cfg.engine
    if e.kind == "standin":
        return EngineSpec(kind="standin", options=dict(model=e.model, max_tokens=e.max_tokens))
    if e.kind == "openai":
        return EngineSpec(kind="openai", options=dict(
            model=e.model, base_url=e.base_url, api_key_env=e.api_key_env, max_concurrency=e.max_concurrency,
            request_timeout_s=e.request_timeout_s or 120.0, max_attempts=e.max_attempts, backoff_s=e.backoff_s,
            max_tokens=e.max_tokens, temperature=e.temperature, top_p=e.top_p, structured=e.openai_structured))
    return EngineSpec(kind=e.kind, options=dict(
        model=e.model, tensor_parallel_size=e.tensor_parallel_size, max_model_len=e.max_model_len,
        gpu_memory_utilization=e.gpu_memory_utilization, enforce_eager=e.enforce_eager,
        max_images_per_prompt=e.max_images_per_prompt, max_tokens=e.max_tokens,
        temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
        repetition_penalty=e.repetition_penalty, seed=cfg.prompt.seed, env=dict(e.env),
        engine_kwargs=dict(e.engine_kwargs), async_engine=e.async_engine, ignore_eos=e.ignore_eos,
        request_timeout_s=e.request_timeout_s or 600.0))


def plan(config: Union[PersQAConfig, dict, str], shards: Optional[list[tuple[str, str]]] = None) -> Plan:
    """Validate everything that can be checked before starting work; raises ConfigError.

    `shards`: already known (path, format) pairs (the DataFlow-style API reads its own file);
    otherwise input.path is listed.
    """
    cfg = load_config(config)
    if shards is not None:
        shards = [Shard(*s) for s in shards]
    else:
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
    cwd = os.getcwd()
    roots = cfg.input.allowed_roots
    if roots is None:  # the input's own directories or bucket prefixes
        roots = sorted({parent_of(s[0]) for s in shards})
        if cfg.input.paths_relative_to == "cwd":
            roots.append(cwd)
    roots = [normalize_url(r) if is_url(r) else os.path.abspath(os.path.expanduser(r)) for r in roots]
    pr = cfg.prompt
    registry = ConceptRegistry(default=pr.tag, registered=tuple(
        Concept(name, f"<{c.tag or name}>", c.class_phrase, c.subject_type) for name, c in pr.concepts.items()))
    req = RequestOptions(
        tag_name=pr.tag, seed=pr.seed, questions_per_image=pr.questions_per_image, language=pr.language,
        templates_path=pr.templates, system_prompt=pr.system_prompt, concepts=registry,
        concept_column=schema.input_column_name(cfg.input.concept_column) if cfg.input.concept_column else None,
        subject_type_column=(schema.input_column_name(cfg.input.subject_type_column)
                             if cfg.input.subject_type_column else None),
        detect_subject_type=pr.detect_subject_type, default_subject_type=pr.default_subject_type,
        recognition=pr.recognition, recognition_check=pr.recognition_check, substitute=pr.substitute_class_phrase)
    try:
        ts = req.templates()
    except TemplateError as e:
        raise ConfigError(f"prompt.templates: {e}") from None
    model_path = cfg.engine.model
    if cfg.engine.kind in ("openai", "standin"):
        pass  # the server's model name (or the stand-in's label), not a path
    elif os.path.exists(os.path.expanduser(model_path)):
        model_path = os.path.abspath(os.path.expanduser(model_path))
    elif model_path.startswith((".", "/", "~")):
        raise ConfigError(f"engine.model: {model_path} does not exist")
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"model": model_path})})
    warnings = []
    for name, problem in _tag_problems(cfg, [pr.tag] + [c.name for c in registry.registered]):
        where = f"prompt.concepts.{name}" if name in pr.concepts else "prompt.tag"
        if pr.tag_vocab_check == "error":
            raise ConfigError(f"{where}: {problem} (prompt.tag_vocab_check: error)")
        warnings.append(f"{where}: {problem}")
    return Plan(
        config=cfg, shards=shards,
        read=ReadOptions(image_column=cfg.input.image_column, id_column=cfg.input.id_column,
                         paths_relative_to=cfg.input.paths_relative_to, cwd=cwd,
                         storage_options=dict(cfg.input.storage_options), block_rows=cfg.input.block_rows,
                         max_record_bytes=cfg.input.max_record_bytes),
        requests=req,
        decode=DecodeOptions(max_pixels=cfg.image.max_pixels, min_pixels=cfg.image.min_pixels,
                             factor=cfg.image.resize_factor, max_aspect_ratio=cfg.image.max_aspect_ratio,
                             max_decode_pixels=cfg.image.max_decode_pixels,
                             max_image_bytes=cfg.input.max_image_bytes,
                             max_images=cfg.engine.max_images_per_prompt, allowed_roots=tuple(roots),
                             allowed_schemes=tuple(s.lower() for s in cfg.input.allowed_schemes),
                             storage_options=dict(cfg.input.storage_options),
                             formats=tuple(f.upper() for f in cfg.image.formats)),
        generate=GenerateOptions(engine=engine_spec(cfg), model_name=cfg.engine.model, requests=req,
                                 prompt_version=ts.prompt_version, seed=cfg.prompt.seed,
                                 pers_qa_format=cfg.output.pers_qa_format or ts.pers_qa_format,
                                 max_retries=cfg.engine.max_retries, guided_prefix=cfg.engine.guided_prefix,
                                 max_engine_restarts=cfg.engine.max_restarts),
        warnings=warnings)


def _tag_problems(cfg: PersQAConfig, names: list[str]) -> list[tuple[str, str]]:
    """(concept name, problem) for tags the model's tokenizer already knows (prompt.tag_vocab_check)."""
    if cfg.prompt.tag_vocab_check == "off" or cfg.engine.kind != "vllm" or not names:
        return []
    tokenizer = load_tokenizer(cfg.engine.model)
    if tokenizer is None:
        return []
    configured = cfg.prompt.concepts
    out = []
    for name in dict.fromkeys(names):
        tag_name = (configured[name].tag or name) if name in configured else name
        problem = vocab_collision(tokenizer, tag_name)
        if problem:
            out.append((name, problem))
    return out


def discover_concepts(p: Plan) -> Plan:
    """The input's concepts, found by a read-only pass over the concept column (Ray tasks; no
    images are read): recognition needs them for 'No' pairs, and each new concept's tag is
    checked against the vocabulary before work starts. Only when input.concept_column is set
    and recognition or the vocabulary check is on."""
    cfg, req = p.config, p.requests
    if not req.concept_column or not (req.recognition or cfg.prompt.tag_vocab_check != "off"):
        return p
    items = [{"shard": s, "format": f} for s, f, *_ in p.shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(concept_values_batch, batch_size=1, batch_format="numpy",
                        fn_kwargs={"opts": p.read, "column": req.concept_column})
    # Each shard batch already yields its distinct values: a union here, no shuffle needed.
    known = sorted({b or cfg.prompt.tag for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow")
                    for b in batch.column("concept").to_pylist()})
    invalid, warnings = [], list(p.warnings)
    registered = {c.name for c in req.registry.registered}
    for name, problem in _tag_problems(cfg, [n for n in known if n not in registered]):
        if cfg.prompt.tag_vocab_check == "error":
            invalid.append((name, f"concept {name!r}: {problem}"))
        else:
            warnings.append(f"concept {name!r} (input): {problem}")
    registry = dataclasses.replace(req.registry, known=tuple(known), invalid=tuple(invalid))
    req = dataclasses.replace(req, concepts=registry)
    log.info("concepts in the input: %d", len(known))
    return dataclasses.replace(p, requests=req, generate=dataclasses.replace(p.generate, requests=req),
                               warnings=warnings)


def preview(p: Plan, n: int = 3) -> list[dict[str, Any]]:
    """The first n rows' requests, built on the driver with no Ray and no engine (--dry-run)."""
    from persqa_ray.io.readers import read_shard
    out: list[dict[str, Any]] = []
    for shard, fmt, *_ in p.shards:
        for table in read_shard(shard, fmt, p.read):
            table = build_requests(table.slice(0, n - len(out)), p.requests)
            for r in table.to_pylist():
                items = r[schema.ITEMS]
                out.append({
                    "row_id": r["row_id"], "image": r["image"], "status": r["status"], "error": r["error"],
                    "concept": r["concept"], "tag": r["tag"], "subject_type": r["subject_type"],
                    "subject_type_source": r["subject_type_source"],
                    "items": [{k: it[k] for k in ("qa_type", "template_id", "question", "prompt", "answer")
                               if it[k] is not None} for it in items],
                    "system_prompt": items[0]["system"] if items else None})
            if len(out) >= n:
                return out
    return out


def init_ray(cfg: PersQAConfig) -> None:
    """Join the configured cluster, the one a `ray job submit` runs in, or start a local Ray."""
    check_ray()
    if ray.is_initialized():
        return
    # --quiet: no worker/engine log lines and no Ray INFO lines (Ray Data's own level comes from
    # RAY_DATA_LOG_LEVEL, which the CLI sets before Ray Data configures its loggers).
    quiet = os.environ.get("PERSQA_QUIET") == "1"
    level = logging.WARNING if quiet else logging.INFO
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address or None, log_to_driver=not quiet, logging_level=level)
        return
    # Small machines: more logical CPUs than cores, so actors holding "all" CPUs cannot starve
    # the read tasks (a measured deadlock on 2 cores; shared/ENVIRONMENT.md).
    num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, object_store_memory=cfg.ray.object_store_memory,
             include_dashboard=False, log_to_driver=not quiet, logging_level=level)


def _compose(p: Plan, stats, resume: Optional[ResumeOptions] = None) -> ray.data.Dataset:
    cfg = p.config
    shard_items = [{"shard": s, "format": f} for s, f, *_ in p.shards]
    ds = ray.data.from_items(shard_items, override_num_blocks=max(1, len(shard_items)))
    # Each read task loads its own shard's resume state (io/resume.py): nothing of it is built here.
    ds = ds.map_batches(read_shards_batch, batch_size=1, batch_format="numpy",
                        fn_kwargs={"opts": p.read, "stats": stats, "resume": resume})
    ds = ds.map_batches(build_requests, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"opts": p.requests})
    # Ray buffers a task's outputs into blocks of up to 128 MiB, so a shard would travel (and be
    # committed) as one block: split into blocks of input.block_rows (streaming, no shuffle). The
    # engine stage then emits one block per input block, and the writer commits each one.
    ds = ds.repartition(target_num_rows_per_block=cfg.input.block_rows)
    ds = ds.map_batches(DecodeStage, fn_constructor_kwargs={"opts": p.decode, "stats": stats},
                        batch_size=cfg.image.batch_size, batch_format="pyarrow",
                        compute=_pool(cfg.image.concurrency), num_cpus=cfg.image.num_cpus,
                        resources=dict(cfg.image.resources) or None)
    remote = cfg.engine.kind in ("openai", "standin")  # CPU actors: no GPU, always async
    asynchronous = remote or cfg.engine.async_engine
    ds = ds.map_batches(AsyncGenerateStage if asynchronous else GenerateStage,
                        fn_constructor_kwargs={"opts": p.generate, "stats": stats},
                        batch_size=cfg.engine.batch_size, batch_format="pyarrow",
                        compute=_pool(cfg.engine.concurrency, cfg.engine.max_batches_in_flight if asynchronous else None),
                        num_cpus=cfg.engine.num_cpus, num_gpus=None if remote else (cfg.engine.num_gpus or None),
                        resources=dict(cfg.engine.resources) or None,
                        **({} if remote else {"runtime_env": ENGINE_ACTOR_ENV}))
    return ds


# An engine actor's exit: Ray's core worker kills the actor's child processes *before* it runs the
# UDF's teardown (`__ray_shutdown__` -> `__del__`), so vLLM's EngineCore and multiprocessing's
# resource tracker died under a live engine worker, which then printed KeyError tracebacks after a
# successful run. Off for engine actors, the engine is shut down in order by its own teardown; its
# processes still exit with the actor when it is killed (measured: within 2 s of ray.kill or SIGKILL).
ENGINE_ACTOR_ENV = {"env_vars": {"RAY_kill_child_processes_on_worker_exit": "0"}}


# Keeps the stats actor of datasets built through the public API alive as long as the session.
_STATS_HANDLES: list = []


class RunFailed(RuntimeError):
    """The run wrote everything it could, but too many rows failed (run.max_error_fraction)."""

    def __init__(self, summary: dict[str, Any]):
        super().__init__(summary.get("failed") or "run failed")
        self.summary = summary


def build_dataset(config: Union[PersQAConfig, dict, str], _plan: Optional[Plan] = None) -> ray.data.Dataset:
    """The whole pipeline as a lazy Ray Dataset of output rows (nothing runs until consumed)."""
    p = _plan or plan(config)
    init_ray(p.config)
    p = resolve_gpus(p)
    p = discover_concepts(p)
    # id_column: the pre-pass results stay under output.path/_work/ (this dataset is lazy, so
    # they cannot be removed here; `--overwrite` clears _work/).
    p, _ = _with_duplicate_ids(p)
    stats = RunStats.remote()
    _STATS_HANDLES.append(stats)
    return _compose(p, stats).drop_columns(list(schema.WRITER_COLUMNS))


def resolve_gpus(p: Plan) -> Plan:
    """engine.num_gpus 'auto' -> a number, from the GPUs of the Ray cluster we are on. A GPU
    request a local Ray can never meet (this machine has none) is refused at once instead of
    waiting forever; on a joined cluster it is only warned about (an autoscaler may add GPU nodes)."""
    e = p.config.engine
    if e.kind != "vllm":
        return p  # openai / standin run in CPU actors
    gpus = ray.cluster_resources().get("GPU", 0)
    if e.num_gpus == "auto":
        n = float(e.tensor_parallel_size) if gpus > 0 else 0.0
        log.info("engine.num_gpus auto -> %g (%g GPU(s) in the Ray cluster)", n, gpus)
    else:
        n = float(e.num_gpus)
        if n > gpus:
            joined = bool(p.config.ray.address or os.environ.get("RAY_ADDRESS"))
            msg = (f"engine.num_gpus: {n:g} GPU(s) per engine actor, but the Ray cluster has {gpus:g}; "
                   "set engine.num_gpus: auto (or 0: the CPU engine, `pip install 'persqa_ray[cpu]'`), "
                   "or run on a cluster with GPU nodes")
            if not joined:
                raise ConfigError(msg)
            log.warning("%s (waiting for an autoscaler to add them)", msg)
    return dataclasses.replace(p, config=p.config.model_copy(
        update={"engine": e.model_copy(update={"num_gpus": n})}))


def _wait_for_engine_actors(stats, timeout_s: float = 15.0) -> None:
    """Wait until the engine actors of this machine have shut their engines down. When the run
    ends, Ray Data lets its actors exit on their own; if this driver exits first, its local Ray
    kills them mid-shutdown and vLLM's processes print tracebacks after a successful summary.
    Actors on other nodes, or killed ones, are not waited for (their pid is not ours to see)."""
    node = ray.get_runtime_context().get_node_id()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        live = [pid for n, pid in ray.get(stats.live_actors.remote("generate")) if n == node and _pid_alive(pid)]
        if not live:
            return
        time.sleep(0.2)
    log.debug("engine actors still shutting down after %.0f s", timeout_s)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _with_duplicate_ids(p: Plan) -> tuple[Plan, Optional[str]]:
    """input.id_column: decide which rows lose a repeated id (a Ray Data aggregation)."""
    cfg = p.config
    if not cfg.input.id_column:
        return p, None
    so = dict(cfg.output.storage_options)
    work = find_duplicate_ids(p.shards, p.read, cfg.output.path, so)
    return dataclasses.replace(p, read=dataclasses.replace(p.read, dups_dir=work, output_storage_options=so)), work


def run(config: Union[PersQAConfig, dict, str], overrides: list[str] = ()) -> dict[str, Any]:
    """Run the job to completion: write the partitioned Parquet output and _summary.json.

    Over an output that already holds part of this run, only rows not yet committed are
    processed (resume); `output.overwrite` starts over; `run.retry_errors` redoes error rows.
    Raises RunFailed (after writing everything) when engine errors pass run.max_error_fraction.
    """
    cfg = load_config(config, overrides)
    p = plan(cfg)
    cfg = p.config
    d = p.decode
    lease = open_output(cfg, p.shards, limits={
        "allowed_roots": list(d.allowed_roots), "allowed_schemes": list(d.allowed_schemes),
        "max_image_bytes": d.max_image_bytes, "max_decode_pixels": d.max_decode_pixels, "formats": list(d.formats)})
    work = None
    try:
        init_ray(cfg)
        started = time.time()
        p = resolve_gpus(p)
        cfg = p.config
        p = discover_concepts(p)
        p, work = _with_duplicate_ids(p)
        for w in p.warnings:
            log.warning("%s", w)
        stats = RunStats.remote()
        resume = ResumeOptions(path=cfg.output.path, storage_options=dict(cfg.output.storage_options),
                               retry_statuses=tuple(cfg.run.retry_errors))
        fault = os.environ.get("PERSQA_FAULT")  # crash tests: see io/commits.py
        wopts = WriteOptions(path=cfg.output.path, storage_options=dict(cfg.output.storage_options),
                             partition_by=tuple(cfg.output.partition_by), fault=fault, driver_pid=os.getpid())
        windows = Windows(p.shards, cfg.run.window_rows)
        for shards in windows:  # one Ray Data execution per window (pipeline/windows.py says why)
            if len(shards) < len(p.shards):
                log.info("window %d: %d shard(s) from %s", windows.windows, len(shards), shards[0].path)
            ds = _compose(dataclasses.replace(p, shards=shards), stats, resume)
            written = ds.map_batches(write_committed, batch_size=None, batch_format="pyarrow",
                                     fn_kwargs={"opts": wopts})
            for _ in written.iter_batches(batch_size=None):  # drives the pipeline; each batch is one count
                pass
            # The window's engines are down before the next window's start (one GPU cannot hold two).
            _wait_for_engine_actors(stats)
            windows.observe(ray.get(stats.rows_in.remote()))
        seconds = time.time() - started
        snapshot = ray.get(stats.snapshot.remote())
        snapshot["windows"] = windows.windows
        ray.kill(stats)
        if lease.lost:
            raise ConfigError(f"output.path: {cfg.output.path}: {lease.lost} during this run; its summary "
                              "is not written (rerun to finish)")
        summary = summarize(cfg.output, snapshot, seconds, model=cfg.engine.model, warnings=p.warnings,
                            max_error_fraction=cfg.run.max_error_fraction)
        write_summary(cfg.output, summary)
    finally:
        remove_work(work, dict(cfg.output.storage_options))
        lease.release()
    if summary.get("failed"):
        raise RunFailed(summary)
    return summary
