"""A run from start to finish, and the lazy dataset a notebook builds (`build_dataset`).

run: plan -> take the output (lease, identity, --overwrite) -> start or join Ray -> resolve
`auto` settings -> concept and duplicate-id passes -> one Ray Data execution per window of shards
(pipeline/windows.py), each committing its blocks -> the summary, a fold over commit records. Each
Ray Data execution is driven from a short-lived worker of its own (cluster.in_own_worker).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Optional, Union

import ray

from persqa_ray import schema
from persqa_ray.config import ConfigError, PersQAConfig, load_config
from persqa_ray.io.commits import WriteOptions
from persqa_ray.io.duplicate_ids import find_duplicate_ids, remove_work
from persqa_ray.io.outputs import open_output, write_concepts
from persqa_ray.io.resume import ResumeOptions
from persqa_ray.io.summary import summarize, write_summary
from persqa_ray.pipeline.cluster import in_own_worker, init_ray, resolve_gpus, wait_for_engine_actors
from persqa_ray.pipeline.concepts import discover_concepts, with_concept_rows
from persqa_ray.pipeline.executors import BLOCK_TARGET_BYTES, drive, on_ray
from persqa_ray.pipeline.plan import Plan, plan
from persqa_ray.pipeline.stage_list import stage_list
from persqa_ray.pipeline.windows import Windows
from persqa_ray.stats import RunStats

log = logging.getLogger("persqa_ray")


class RunFailed(RuntimeError):
    """The run wrote everything it could, but too many rows failed (run.max_error_fraction)."""

    def __init__(self, summary: dict[str, Any]):
        super().__init__(summary.get("failed") or "run failed")
        self.summary = summary


def _prepare(p: Plan) -> tuple[Plan, Optional[str]]:
    """On Ray, before the stages: `auto` GPUs, the input's concepts, and with input.id_column the
    rows that lose a repeated id (a Ray Data aggregation; its results live under output.path/_work/)."""
    init_ray(p.config)
    p = discover_concepts(resolve_gpus(p))
    cfg, work = p.config, None
    if cfg.input.id_column:
        so = dict(cfg.output.storage_options)
        work = in_own_worker(find_duplicate_ids, p.shards, p.read, cfg.output.path, so)
        p = dataclasses.replace(p, read=dataclasses.replace(p.read, dups_dir=work, output_storage_options=so))
    return with_concept_rows(p), work


def build_dataset(config: Union[PersQAConfig, dict, str], _plan: Optional[Plan] = None) -> ray.data.Dataset:
    """The whole pipeline as a lazy Ray Dataset of output rows (nothing runs until consumed).
    With input.id_column the pre-pass results stay under output.path/_work/ (the dataset is lazy,
    so they cannot be removed here; `--overwrite` clears _work/)."""
    p, _ = _prepare(_plan or plan(config))
    # The stats actor lives as long as a handle does: the stages' arguments, held by the dataset's plan.
    stages = stage_list(p, RunStats.remote())
    return on_ray(stages, p.shards).drop_columns(list(schema.WRITER_COLUMNS))


def run(config: Union[PersQAConfig, dict, str], overrides: list[str] = ()) -> dict[str, Any]:
    """Run the job to completion: write the partitioned Parquet output and _summary.json.

    Over an output that already holds part of this run, only rows not yet committed are
    processed (resume); `output.overwrite` starts over; `run.retry_errors` redoes error rows.
    Raises RunFailed (after writing everything) when engine errors pass run.max_error_fraction.
    """
    p = plan(load_config(config, overrides))
    cfg = p.config
    lease = open_output(cfg, p.shards, limits=p.decode.limits())
    work = None
    try:
        started = time.time()
        p, work = _prepare(p)
        write_concepts(cfg.output, p.personalization.registry)
        for w in p.warnings:
            log.warning("%s", w)
        stats = RunStats.remote()
        windows = _execute(p, stats, lease.owner)
        seconds = time.time() - started
        snapshot = {**ray.get(stats.snapshot.remote()), "windows": windows}
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


def _execute(p: Plan, stats, run_id: str) -> int:
    """One Ray Data execution per window of shards; returns the number of windows. `run_id` (the
    lease owner) marks this run's commits, which its read tasks never take for earlier work."""
    cfg = p.config
    fault = os.environ.get("PERSQA_FAULT")  # crash tests: io/commits.py, io/resume.py, stages/generate.py
    resume = ResumeOptions(path=cfg.output.path, storage_options=dict(cfg.output.storage_options),
                           retry_statuses=tuple(cfg.run.retry_errors), run_id=run_id, fault=fault)
    write = WriteOptions(path=cfg.output.path, storage_options=dict(cfg.output.storage_options),
                         partition_by=tuple(cfg.output.partition_by), driver_pid=os.getpid(),
                         fault=fault, run_id=run_id)
    if fault:  # the engine faults (stages/generate.py GenerateStage._maybe_fault)
        p = dataclasses.replace(p, generate=dataclasses.replace(p.generate, fault=fault))
    stages = stage_list(p, stats, resume, write)
    # PERSQA_FAULT=read_crash: blocks leave a read task one at a time (a 1-byte block target),
    # so the task can die after rows it yielded were committed (io/resume.py crash_read_task_once).
    block_target = 1 if fault == "read_crash" else BLOCK_TARGET_BYTES
    windows = Windows(p.shards, cfg.run.window_rows)
    for shards in windows:
        if len(shards) < len(p.shards):
            log.info("window %d: %d shard(s) from %s", windows.windows, len(shards), shards[0].path)
        rows, pid = in_own_worker(_window, stages, shards, stats, block_target)
        # Ray Data's own log lines for the window are in that worker's log (worker-*-<pid>.out).
        log.info("window %d: %d output rows, driven by Ray worker pid %d", windows.windows, rows, pid)
        windows.observe(ray.get(stats.rows_in.remote()))
    return windows.windows


def _window(stages, shards, stats, block_target_bytes: int) -> tuple[int, int]:
    """One window's execution (in a worker of its own: cluster.in_own_worker)."""
    rows = drive(on_ray(stages, shards, block_target_bytes))
    # The window's engines are down before it returns: before the next window starts (one GPU cannot
    # hold two), and before this worker is killed (with it the actors it owns, mid-shutdown).
    wait_for_engine_actors(stats)
    return rows, os.getpid()
