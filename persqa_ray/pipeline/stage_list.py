"""The pipeline's stages, in order: the one place that knows it.

    shard list -> read (tasks) -> items (tasks, fused with the read) -> blocks (re-blocking)
      -> decode (CPU actor pool) -> generate (engine actor pool) -> write (commit protocol)

Runs, notebooks (`build_dataset`) and the DataFlow face all run this list; the face runs the
stages that work in-process (not read nor write: it reads and writes its own storage).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from persqa_ray.io.commits import WriteOptions
from persqa_ray.io.resume import ResumeOptions
from persqa_ray.stages.base import Stage, check_chain
from persqa_ray.stages.blocks import blocks_stage
from persqa_ray.stages.decode import decode_stage
from persqa_ray.stages.generate import generate_stage
from persqa_ray.stages.items import items_stage
from persqa_ray.stages.read import SHARD_COLUMNS, read_stage
from persqa_ray.stages.write import write_stage

if TYPE_CHECKING:
    from persqa_ray.pipeline.plan import Plan


def stage_list(p: "Plan", stats: Any = None, resume: Optional[ResumeOptions] = None,
               write: Optional[WriteOptions] = None) -> list[Stage]:
    stages = [read_stage(p, stats, resume), items_stage(p), blocks_stage(p), decode_stage(p, stats),
              generate_stage(p, stats)]
    if write is not None:
        stages.append(write_stage(write))
    check_chain(stages, SHARD_COLUMNS)
    return stages
