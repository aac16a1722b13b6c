"""The two executors of a stage list: Ray Data (runs, notebooks) and this process (the DataFlow
face's small inputs, with an engine it already holds)."""
from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from persqa_ray.engines.base import run_sync
from persqa_ray.io.filesystems import Shard
from persqa_ray.stages.base import Stage

# Ray Data shapes what each step of a task yields into blocks of up to target_max_block_size
# (128 MiB by default), between fused steps too: a read task held up to that much of its shard, and
# the items step made Python objects of a whole block (~3 KB a row: 556 MiB for a 125k-row shard).
# This smaller target, on the run's own dataset context (a notebook's global context is left
# alone), with the items step in batches of input.block_rows, bounds a read task by the target
# instead of its shard (docs/BENCHMARKS.md). Decoded blocks hold ~5 camera-size images at most
# (generate re-batches to engine.batch_size).
BLOCK_TARGET_BYTES = 16 * 2**20


def shard_dataset(shards: Sequence[Shard], block_target_bytes: int = BLOCK_TARGET_BYTES):
    """The shard list as a Ray Dataset: one block per shard, so each shard is one read task."""
    import ray
    items = [{"shard": s.path, "format": s.format} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds.context.target_max_block_size = block_target_bytes
    return ds


def on_ray(stages: Sequence[Stage], shards: Sequence[Shard], block_target_bytes: int = BLOCK_TARGET_BYTES):
    """The stages over the shards as one lazy Ray Dataset (nothing runs until it is consumed)."""
    ds = shard_dataset(shards, block_target_bytes)
    for st in stages:
        ds = st.apply(ds)
    return ds


def in_process(stages: Sequence[Stage], table: pa.Table, replace: Optional[dict[str, dict]] = None) -> pa.Table:
    """Run the in-process stages over a table, batch by batch, here. `replace`: constructor
    arguments to override per stage (the DataFlow face hands the generate stage its engine).
    Async stages run on the process's engine loop (engines/base.run_sync), the loop the face's
    engine already serves from."""
    for st in stages:
        if not st.in_process or st.udf is None:
            continue
        kwargs = {**st.kwargs, **(replace or {}).get(st.name, {})}
        call = st.udf(**kwargs) if st.is_class else (lambda batch, _f=st.udf, _k=kwargs: _f(batch, **_k))
        step = st.batch_size or max(1, table.num_rows)
        parts = []
        for start in range(0, max(1, table.num_rows), step):
            out = call(table.slice(start, step))
            parts.append(run_sync(out) if inspect.isawaitable(out) else out)
        table = pa.concat_tables(parts, promote_options="permissive") if parts else table
        del call  # a class stage's teardown (__del__) runs now, not at some later collection
    return table


def drive(ds: Any) -> int:
    """Consume a dataset whose blocks are counts (the write stage's): the driver sees only those."""
    return sum(int(pc.sum(b.column("rows")).as_py() or 0)
               for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
