"""Write stage (Ray tasks): commit each output block through the commit protocol (io/commits.py),
one unit per input shard it holds; what comes out is a row count per block, which the driver only
counts (the summary is a fold over commit records, io/summary.py)."""
from __future__ import annotations

from persqa_ray import schema
from persqa_ray.io.commits import WriteOptions, write_committed
from persqa_ray.stages.base import Stage


def write_stage(opts: WriteOptions) -> Stage:
    return Stage("write", write_committed, {"opts": opts}, needs=("row_id", "status") + schema.WRITER_COLUMNS,
                 adds=("rows",), in_process=False)
