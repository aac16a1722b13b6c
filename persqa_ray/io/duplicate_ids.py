"""input.id_column duplicates, decided once per run by a Ray Data aggregation (no single actor or
driver holds the ids).

Rule: among rows sharing an id, the first in (shard path order, position in shard) keeps it; every
other becomes a `duplicate_row_id` row with its positional id. The rule depends on the input only,
never on read order, task retries or resumes (done rows take part too).

How: a pre-pass reads only each row's id (one Ray task per shard), groups by id (a hash shuffle
across the cluster), and writes the positions of the non-first rows under the output's
`_work/dups-<run>/<shard key>/` (a directory of this invocation only); each read task then loads
just its own shard's list. Cost: one more read
of the input and a shuffle of (id, shard, position) — paid only when input.id_column is set.
"""
from __future__ import annotations

import json
import uuid
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from persqa_ray.io.commits import output_root, shard_key

WORK_DIR = "_work"


def id_values_batch(batch: dict, opts) -> Iterator[pa.Table]:
    """map_batches UDF over (shard, format, order): each row's given id and place."""
    from persqa_ray.io.readers import iter_records
    for shard, fmt, order in zip(batch["shard"], batch["format"], batch["order"]):
        ids, positions = [], []
        try:
            for row in iter_records(str(shard), str(fmt), opts):
                if row.get("_pq_given_id") is not None:
                    ids.append(row["_pq_given_id"])
                    positions.append(row["_pq_position"])
        except Exception:  # noqa: BLE001 - an unreadable shard: the main read names it in the summary
            pass
        if ids:
            n = len(ids)
            yield pa.table({"id": pa.array(ids, pa.string()), "order": pa.array([int(order)] * n, pa.int64()),
                            "position": pa.array(positions, pa.int64()),
                            "shard_key": pa.array([shard_key(str(shard))] * n, pa.string())})


def non_first(group: pa.Table) -> pa.Table:
    """map_groups UDF: the rows of one id other than its first occurrence."""
    if group.num_rows < 2:
        return group.slice(0, 0)
    return group.sort_by([("order", "ascending"), ("position", "ascending")]).slice(1)


def write_dups(batch: pa.Table, path: str, storage_options: dict) -> pa.Table:
    """map_batches UDF: one small JSON file of positions per shard key in the batch."""
    if not batch.num_rows:
        return pa.table({"n": pa.array([], pa.int64())})
    fs, root = output_root(path, storage_options)
    keys = batch.column("shard_key")
    for key in pc.unique(keys).to_pylist():
        positions = batch.filter(pc.equal(keys, key)).column("position").to_pylist()
        d = f"{root}/{key}"
        fs.makedirs(d, exist_ok=True)
        with fs.open(f"{d}/{uuid.uuid4().hex}.json", "w") as f:
            json.dump(sorted(positions), f)
    return pa.table({"n": [batch.num_rows]})


def find_duplicate_ids(shards: list[tuple[str, str]], read_opts, out_path: str, storage_options: dict) -> str:
    """Run the pre-pass (Ray must be initialized); returns the directory of its results (under
    output.path/_work/, this invocation's own: remove it with `remove_work`)."""
    import ray
    work = f"{out_path.rstrip('/')}/{WORK_DIR}/dups-{uuid.uuid4().hex[:12]}"
    items = [{"shard": s, "format": f, "order": i} for i, (s, f, *_) in enumerate(shards)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(id_values_batch, batch_size=1, batch_format="numpy", fn_kwargs={"opts": read_opts})
    dups = ds.groupby("id").map_groups(non_first, batch_format="pyarrow")
    written = dups.map_batches(write_dups, batch_size=None, batch_format="pyarrow",
                               fn_kwargs={"path": work, "storage_options": storage_options})
    for _ in written.iter_batches(batch_size=None):
        pass
    return work


def remove_work(work: Optional[str], storage_options: dict) -> None:
    if work:
        fs, root = output_root(work, storage_options)
        if fs.exists(root):
            fs.rm(root, recursive=True)


def load_duplicate_positions(shard: str, work: Optional[str], storage_options: dict) -> set[int]:
    """This shard's positions that lose their id (read task side; one shard's list)."""
    if not work:
        return set()
    fs, root = output_root(work, storage_options)
    d = f"{root}/{shard_key(shard)}"
    if not fs.exists(d):
        return set()
    out: set[int] = set()
    for p in fs.ls(d, detail=False):
        with fs.open(p, "r") as f:
            out.update(json.load(f))
    return out
