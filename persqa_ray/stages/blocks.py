"""Blocks stage: re-block the read rows into blocks of `input.block_rows` (no UDF, no shuffle).

Ray buffers a task's outputs into blocks of up to 128 MiB, so a whole shard would travel, and be
committed, as one block. Each block of this size is decoded, generated and committed as a unit:
the most work a crash can cost per block in flight.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from persqa_ray.stages.base import Stage

if TYPE_CHECKING:
    from persqa_ray.pipeline.plan import Plan


def blocks_stage(p: "Plan") -> Stage:
    return Stage("blocks", block_rows=p.config.input.block_rows)
