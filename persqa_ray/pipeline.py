"""Composes the stages on Ray Data. The only module that knows their order:

    shard list -> read+normalize (tasks) -> build requests (tasks, fused with the read)
      -> decode (CPU actor pool) -> generate + validate (engine actor pool) -> write Parquet
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import ray

from persqa_ray.config import ConfigError, PersQAConfig, load_config
from persqa_ray.engines.base import EngineSpec
from persqa_ray.io.filesystems import is_url, list_shards, parent_of
from persqa_ray.io.readers import ReadOptions, read_shards_batch
from persqa_ray.io.writers import WriteOptions, prepare_output, summarize, write_committed, write_summary
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
            request_timeout_s=e.request_timeout_s, max_attempts=e.max_attempts, backoff_s=e.backoff_s,
            max_tokens=e.max_tokens, temperature=e.temperature, top_p=e.top_p, structured=e.openai_structured))
    return EngineSpec(kind=e.kind, options=dict(
        model=e.model, tensor_parallel_size=e.tensor_parallel_size, max_model_len=e.max_model_len,
        gpu_memory_utilization=e.gpu_memory_utilization, enforce_eager=e.enforce_eager,
        max_images_per_prompt=e.max_images_per_prompt, max_tokens=e.max_tokens,
        temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
        repetition_penalty=e.repetition_penalty, seed=cfg.prompt.seed, env=dict(e.env),
        engine_kwargs=dict(e.engine_kwargs), async_engine=e.async_engine, ignore_eos=e.ignore_eos))


def plan(config: Union[PersQAConfig, dict, str], shards: Optional[list[tuple[str, str]]] = None) -> Plan:
    """Validate everything that can be checked before starting work; raises ConfigError.

    `shards`: already known (path, format) pairs (the DataFlow-style API reads its own file);
    otherwise input.path is listed.
    """
    cfg = load_config(config)
    if shards is None:
        try:
            shards = list_shards(cfg.input.path, cfg.input.format, cfg.input.storage_options)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - unreachable bucket, bad credentials, ...
            raise ConfigError(f"input.path: cannot list {cfg.input.path} ({type(e).__name__}: {e})") from None
    cwd = os.getcwd()
    roots = cfg.input.allowed_roots
    if roots is None:
        roots = sorted({parent_of(s) for s, _ in shards if not is_url(s)})
        if cfg.input.paths_relative_to == "cwd":
            roots.append(cwd)
    roots = [os.path.abspath(os.path.expanduser(r)) for r in roots]
    req = RequestOptions(tag_name=cfg.prompt.tag, seed=cfg.prompt.seed,
                         questions_per_image=cfg.prompt.questions_per_image, language=cfg.prompt.language,
                         templates_path=cfg.prompt.templates, system_prompt=cfg.prompt.system_prompt)
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
    return Plan(
        config=cfg, shards=shards,
        read=ReadOptions(image_column=cfg.input.image_column, id_column=cfg.input.id_column,
                         paths_relative_to=cfg.input.paths_relative_to, cwd=cwd,
                         storage_options=dict(cfg.input.storage_options), block_rows=cfg.input.block_rows),
        requests=req,
        decode=DecodeOptions(max_pixels=cfg.image.max_pixels, min_pixels=cfg.image.min_pixels,
                             factor=cfg.image.resize_factor, max_aspect_ratio=cfg.image.max_aspect_ratio,
                             max_decode_pixels=cfg.image.max_decode_pixels,
                             max_image_bytes=cfg.input.max_image_bytes,
                             max_images=cfg.engine.max_images_per_prompt, allowed_roots=tuple(roots),
                             allowed_schemes=tuple(s.lower() for s in cfg.input.allowed_schemes),
                             storage_options=dict(cfg.input.storage_options)),
        generate=GenerateOptions(engine=engine_spec(cfg), model_name=cfg.engine.model,
                                 system_prompt=req.render_system_prompt(), prompt_version=ts.prompt_version,
                                 seed=cfg.prompt.seed, pers_qa_format=cfg.output.pers_qa_format,
                                 max_retries=cfg.engine.max_retries, guided_prefix=cfg.engine.guided_prefix))


def init_ray(cfg: PersQAConfig) -> None:
    """Join the configured cluster, the one a `ray job submit` runs in, or start a local Ray."""
    check_ray()
    if ray.is_initialized():
        return
    log_to_driver = os.environ.get("PERSQA_QUIET") != "1"  # --quiet: no worker/engine log lines
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address or None, log_to_driver=log_to_driver)
        return
    # Small machines: more logical CPUs than cores, so actors holding "all" CPUs cannot starve
    # the read tasks (a measured deadlock on 2 cores; shared/ENVIRONMENT.md).
    num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, object_store_memory=cfg.ray.object_store_memory,
             include_dashboard=False, log_to_driver=log_to_driver)


def _compose(p: Plan, stats, done=None) -> ray.data.Dataset:
    cfg = p.config
    shard_items = [{"shard": s, "format": f} for s, f in p.shards]
    ds = ray.data.from_items(shard_items, override_num_blocks=max(1, len(shard_items)))
    ds = ds.map_batches(read_shards_batch, batch_size=1, batch_format="numpy",
                        fn_kwargs={"opts": p.read, "stats": stats, "done": done})
    ds = ds.map_batches(build_requests, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"opts": p.requests})
    # Ray buffers a task's outputs into blocks of up to 128 MiB, so a shard would travel (and be
    # committed) as one block: split into blocks of input.block_rows (streaming, no shuffle). The
    # engine stage then emits one block per input block, and the writer commits each one.
    ds = ds.repartition(target_num_rows_per_block=cfg.input.block_rows)
    ds = ds.map_batches(DecodeStage, fn_constructor_kwargs={"opts": p.decode},
                        batch_size=cfg.image.batch_size, batch_format="pyarrow",
                        compute=_pool(cfg.image.concurrency), num_cpus=cfg.image.num_cpus)
    remote = cfg.engine.kind in ("openai", "standin")  # CPU actors: no GPU, always async
    asynchronous = remote or cfg.engine.async_engine
    ds = ds.map_batches(AsyncGenerateStage if asynchronous else GenerateStage,
                        fn_constructor_kwargs={"opts": p.generate, "stats": stats},
                        batch_size=cfg.engine.batch_size, batch_format="pyarrow",
                        compute=_pool(cfg.engine.concurrency, cfg.engine.max_batches_in_flight if asynchronous else None),
                        num_cpus=cfg.engine.num_cpus, num_gpus=None if remote else (cfg.engine.num_gpus or None))
    return ds


# Keeps the stats actor of datasets built through the public API alive as long as the session.
_STATS_HANDLES: list = []


def build_dataset(config: Union[PersQAConfig, dict, str], _plan: Optional[Plan] = None) -> ray.data.Dataset:
    """The whole pipeline as a lazy Ray Dataset of output rows (nothing runs until consumed)."""
    p = _plan or plan(config)
    init_ray(p.config)
    stats = RunStats.remote()
    _STATS_HANDLES.append(stats)
    return _compose(p, stats)


def run(config: Union[PersQAConfig, dict, str], overrides: list[str] = ()) -> dict[str, Any]:
    """Run the job to completion: write the partitioned Parquet output and _summary.json.

    Over an output that already holds part of this run, only rows not yet committed are
    processed (resume); `output.overwrite` starts over.
    """
    cfg = load_config(config, overrides)
    p = plan(cfg)
    cfg = p.config
    resume = prepare_output(cfg)
    init_ray(cfg)
    started = time.time()
    stats = RunStats.remote()
    # Row ids done earlier, as one sorted fixed-width array (compact, binary-searchable in tasks).
    done = np.unique(np.array(resume.done_row_ids, dtype=str)) if resume.done_row_ids else None
    ds = _compose(p, stats, done)
    wopts = WriteOptions(path=cfg.output.path, storage_options=dict(cfg.output.storage_options),
                         partition_by=tuple(cfg.output.partition_by))
    written = ds.map_batches(write_committed, batch_size=None, batch_format="pyarrow", fn_kwargs={"opts": wopts})
    for _ in written.iter_batches(batch_size=None):  # drives the pipeline; each batch is one count
        pass
    seconds = time.time() - started
    snapshot = ray.get(stats.snapshot.remote())
    ray.kill(stats)
    summary = summarize(cfg.output, snapshot, seconds, model=cfg.engine.model,
                        orphans_removed=resume.orphans_removed)
    write_summary(cfg.output, summary)
    return summary
