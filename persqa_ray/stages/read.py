"""Read stage (Ray tasks over the shard list): each shard is parsed by one task, streaming out
normalized rows (io/readers.py: row ids, resolved image references, bad records as error rows).

With a resume, the task loads its own shard's commit state first and skips rows an earlier run
committed (io/resume.py); nothing of it is built on the driver.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from persqa_ray import schema
from persqa_ray.io.readers import read_shards_batch
from persqa_ray.io.resume import ResumeOptions
from persqa_ray.stages.base import Stage

if TYPE_CHECKING:
    from persqa_ray.pipeline.plan import Plan

SHARD_COLUMNS = ("shard", "format")  # the rows of the shard list this stage reads


def read_stage(p: "Plan", stats: Any = None, resume: Optional[ResumeOptions] = None) -> Stage:
    return Stage("read", read_shards_batch, {"opts": p.read, "stats": stats, "resume": resume},
                 needs=SHARD_COLUMNS, adds=("row_id", "image", "status", "error") + schema.WRITER_COLUMNS,
                 batch_size=1, batch_format="numpy", in_process=False)
