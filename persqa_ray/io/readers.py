"""Read input shards into normalized rows: row_id, resolved image list, status, input columns.

Why not `ray.data.read_json`: it fails the whole job on one malformed line and knows nothing of a
row's position in its file, which our row ids need. Each shard is parsed by one Ray task (the
shard list is a Ray dataset), streaming out batches of rows, so a million-row shard never sits
in memory at once; a bad line becomes a `bad_record` row and a shard that cannot be parsed at all
is reported by name in the run summary.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from persqa_ray import schema
from persqa_ray.io.filesystems import filesystem, parent_of
from persqa_ray.io.image_refs import RefError, as_ref_list, resolve
from persqa_ray.io.row_ids import given_row_id, positional_row_id

READ_BATCH_ROWS = 512


@dataclass(frozen=True)
class ReadOptions:
    image_column: str
    id_column: Optional[str]
    paths_relative_to: str  # "input_dir" | "cwd"
    cwd: str                # the driver's cwd, captured when the pipeline is built
    storage_options: dict[str, Any]
    block_rows: int = READ_BATCH_ROWS


def normalize_row(record: Any, shard: str, position: int, opts: ReadOptions) -> dict[str, Any]:
    """One input record -> one normalized row (never raises: problems become a status)."""
    row: dict[str, Any] = {"row_id": positional_row_id(shard, position), "image": [],
                           "status": schema.OK, "error": None, schema.SOURCE: shard}
    if not isinstance(record, dict):
        row.update(status=schema.BAD_RECORD,
                   error=f"{os.path.basename(shard)} row {position}: a {type(record).__name__}, not an object")
        return row
    if opts.id_column:
        rid = given_row_id(record.get(opts.id_column))
        if rid is not None:
            row["_pq_positional_id"], row["_pq_given_id"] = row["row_id"], rid
            row["row_id"] = rid
    for key, value in record.items():
        if key != opts.image_column:
            row[schema.input_column_name(key)] = value
    if opts.image_column not in record:
        row.update(status=schema.MISSING_COLUMN,
                   error=f"{os.path.basename(shard)} row {position}: no '{opts.image_column}' column")
        return row
    raw = record[opts.image_column]
    try:
        refs = as_ref_list(raw)
    except RefError as e:
        row.update(status=e.status, error=str(e),
                   image=[str(x) for x in raw] if isinstance(raw, (list, tuple)) else
                   ([] if raw is None else [str(raw)]))
        return row
    base = parent_of(shard) if opts.paths_relative_to == "input_dir" else opts.cwd
    row["image"] = [resolve(r, base) for r in refs]
    return row


def _jsonl_records(f, shard: str, opts: ReadOptions) -> Iterator[dict]:
    position = 0
    for lineno, raw in enumerate(f, start=1):
        if not raw.strip():
            continue  # blank lines are not rows (rows_in counts non-blank lines)
        text = raw.decode("utf-8", errors="replace")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            row = normalize_row(None, shard, position, opts)
            row.update(status=schema.BAD_RECORD,
                       error=f"{os.path.basename(shard)} line {lineno}: not valid JSON ({e.msg})")
        else:
            row = normalize_row(record, shard, position, opts)
        position += 1
        yield row


def _parquet_records(f, shard: str, opts: ReadOptions) -> Iterator[dict]:
    position = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH_ROWS):
        for record in batch.to_pylist():
            yield normalize_row(record, shard, position, opts)
            position += 1


def _column(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # An input column with mixed types across rows (an int here, a string there): keep its
        # values as JSON text rather than losing the batch.
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values],
                        pa.string())


def rows_to_table(rows: list[dict]) -> pa.Table:
    # Every key of every row becomes a column (pa.Table.from_pylist would keep only the first
    # row's keys and silently drop columns that appear later).
    names = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.table({n: _column([r.get(n) for r in rows]) for n in names})
    # Pin the types of our own columns (a batch of only error rows would infer null types).
    fixed = {"row_id": pa.string(), "image": pa.list_(pa.string()), "status": pa.string(),
             "error": pa.string(), schema.SOURCE: pa.string()}
    for name, typ in fixed.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, table.column(name).cast(typ))
    return table


def is_done(row_ids: list[str], done: Optional[np.ndarray]) -> list[bool]:
    """Membership in the sorted array of row ids a previous run already committed."""
    if done is None or len(done) == 0:
        return [False] * len(row_ids)
    q = np.array(row_ids, dtype=str)  # numpy compares across string widths: no truncation
    pos = np.searchsorted(done, q).clip(0, len(done) - 1)
    return list(done[pos] == q)


def _finish(rows: list[dict], opts: ReadOptions, stats, done) -> Optional[pa.Table]:
    """Drop rows a previous run committed (resume); flag repeated id_column values."""
    if not rows:
        return None
    skip = is_done([r["row_id"] for r in rows], done)
    kept = [r for r, s in zip(rows, skip) if not s]
    if stats is not None and sum(skip):
        stats.add.remote("rows_resumed", int(sum(skip)))
    if opts.id_column and stats is not None and kept:
        import ray
        given = [r for r in kept if r.get("_pq_given_id")]
        owned = ray.get(stats.claim.remote([r["_pq_given_id"] for r in given]))
        for r, mine in zip(given, owned):
            if not mine:
                r.update(row_id=r["_pq_positional_id"], status=schema.DUPLICATE_ROW_ID,
                         error=f"input.id_column value {r['_pq_given_id']!r} is already used by another row")
    for r in kept:
        r.pop("_pq_given_id", None)
        r.pop("_pq_positional_id", None)
    return rows_to_table(kept) if kept else None


def read_shard(shard: str, fmt: str, opts: ReadOptions, stats=None,
               done: Optional[np.ndarray] = None) -> Iterator[pa.Table]:
    """Yield batches of normalized rows for one shard; report its row count (or failure) to stats."""
    fs, p = filesystem(shard, opts.storage_options)
    records = _jsonl_records if fmt == "jsonl" else _parquet_records
    rows: list[dict] = []
    count = 0
    try:
        with fs.open(p, "rb") as f:
            if fmt == "parquet":
                f = io.BytesIO(f.read()) if not hasattr(f, "seek") else f
            for row in records(f, shard, opts):
                rows.append(row)
                count += 1
                if len(rows) >= opts.block_rows:
                    table = _finish(rows, opts, stats, done)
                    rows = []
                    if table is not None:
                        yield table
    except Exception as e:  # noqa: BLE001 - a shard that cannot be parsed is reported, not fatal
        if stats is not None:
            import ray
            ray.get(stats.shard_failed.remote(shard, f"{type(e).__name__}: {e}", count))
        table = _finish(rows, opts, stats, done)
        if table is not None:
            yield table
        return
    table = _finish(rows, opts, stats, done)
    if table is not None:
        yield table
    if stats is not None:
        import ray
        ray.get(stats.shard_read.remote(shard, count))


def read_shards_batch(batch: dict, opts: ReadOptions, stats=None, done=None) -> Iterator[pa.Table]:
    """map_batches UDF over the shard list: each batch holds one or more (shard, format) items."""
    for shard, fmt in zip(batch["shard"], batch["format"]):
        yield from read_shard(str(shard), str(fmt), opts, stats, done)


def concept_values_batch(batch: dict, opts: ReadOptions, column: str) -> Iterator[pa.Table]:
    """map_batches UDF for the concept pre-pass: the distinct values of the concept column per
    shard batch (empty values stand for the default concept and come back as '')."""
    for shard, fmt in zip(batch["shard"], batch["format"]):
        for table in read_shard(str(shard), str(fmt), opts):
            values = table.column(column).to_pylist() if column in table.column_names else [None]
            distinct = sorted({"" if v is None else str(v).strip() for v in values})
            yield pa.table({"concept": pa.array(distinct, pa.string())})
