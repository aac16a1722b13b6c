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
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from persqa_ray import schema
from persqa_ray.io.concept_rows import CONCEPTS_FORMAT, concept_records
from persqa_ray.io.duplicate_ids import load_duplicate_positions
from persqa_ray.io.filesystems import filesystem, parent_of
from persqa_ray.io.image_refs import RefError, as_ref_list, resolve
from persqa_ray.io.resume import ResumeOptions, ShardState, crash_read_task_once, load_shard_state, retry_owner
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
    dups_dir: Optional[str] = None     # id_column: the duplicate-id pre-pass results (io/duplicate_ids.py)
    output_storage_options: dict[str, Any] = field(default_factory=dict)
    max_record_bytes: int = 16 * 2**20  # a longer JSONL line is a bad_record row, never read whole
    concept_rows: tuple = ()            # text-only QA: (concept, reference images) pairs (io/concept_rows.py)
    concept_column: Optional[str] = None  # input.concept_column: its names are parsed into schema.CONCEPTS

    @classmethod
    def from_config(cls, cfg, cwd: str) -> "ReadOptions":
        i = cfg.input
        return cls(image_column=i.image_column, id_column=i.id_column, paths_relative_to=i.paths_relative_to,
                   cwd=cwd, storage_options=dict(i.storage_options), block_rows=i.block_rows,
                   max_record_bytes=i.max_record_bytes, concept_column=i.concept_column)


def concept_names(value: Any) -> list[str]:
    """A concept column's value as names: [] for none (the default concept), one for a name,
    several (de-duplicated, in order) for a list."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(str(v).strip() for v in values if v is not None and str(v).strip()))


def normalize_row(record: Any, shard: str, position: int, opts: ReadOptions) -> dict[str, Any]:
    """One input record -> one normalized row (never raises: problems become a status)."""
    row: dict[str, Any] = {"row_id": positional_row_id(shard, position), "image": [],
                           "status": schema.OK, "error": None, schema.SOURCE: shard, schema.POSITION: position,
                           schema.REPLACES: None}
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
    if opts.concept_column:  # a name or a list of names (a multi-concept image), whatever the rest of the column holds
        row[schema.CONCEPTS] = concept_names(record.get(opts.concept_column))

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


def _never(position: int) -> bool:
    return False


def bounded_lines(f, limit: int, chunk: int = 1 << 20) -> Iterator[tuple[Optional[bytes], int]]:
    """(line, length) for each line of a binary file object (local or remote); a line longer than
    `limit` bytes comes as (None, length) and is never held in memory whole."""
    buf, skipped = b"", 0  # skipped > 0: inside an over-long line, this many bytes passed over
    while True:
        data = f.read(chunk)
        if not data:
            break
        buf += data
        start = 0
        while (i := buf.find(b"\n", start)) >= 0:
            line, start = buf[start:i + 1], i + 1
            if skipped or len(line) > limit:
                yield None, skipped + len(line)
                skipped = 0
            else:
                yield line, len(line)
        buf = buf[start:]
        if len(buf) > limit:
            skipped, buf = skipped + len(buf), b""
    if skipped or len(buf) > limit:
        yield None, skipped + len(buf)
    elif buf:
        yield buf, len(buf)


# `skip(position)`: rows an earlier run committed are counted (None) but not parsed: a resume of a
# big output costs a scan of its shards, not a second parse of every row.
def _jsonl_records(f, shard: str, opts: ReadOptions, skip=_never) -> Iterator[Optional[dict]]:
    position = 0
    for lineno, (raw, size) in enumerate(bounded_lines(f, opts.max_record_bytes), start=1):
        if raw is not None and not raw.strip():
            continue  # blank lines are not rows (rows_in counts non-blank lines)
        if skip(position):
            position += 1
            yield None
            continue
        if raw is None:  # never parsed (nor held): too long to be a record
            row = normalize_row(None, shard, position, opts)
            row.update(status=schema.BAD_RECORD, error=f"{os.path.basename(shard)} line {lineno}: {size} bytes, "
                       f"over input.max_record_bytes={opts.max_record_bytes}")
            position += 1
            yield row
            continue
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


def _parquet_records(f, shard: str, opts: ReadOptions, skip=_never) -> Iterator[Optional[dict]]:
    position = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH_ROWS):
        if skip(position) and skip(position + batch.num_rows - 1):  # a done block: ranges are contiguous
            if all(skip(p) for p in range(position, position + batch.num_rows)):
                position += batch.num_rows
                yield from [None] * batch.num_rows
                continue
        for record in batch.to_pylist():
            yield None if skip(position) else normalize_row(record, shard, position, opts)
            position += 1


def _column(values: list) -> pa.Array:
    """One input column of a block. Nested values (lists, objects) are kept as JSON text, always:
    a column that is a list in one row and a name in another would otherwise take a different type
    in different blocks, which Ray cannot merge into one schema (the job would stop). Mixed scalar
    kinds within a block (an int here, a string there) become JSON text too, rather than losing the
    batch."""
    if any(isinstance(v, (list, tuple, dict)) for v in values):
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values],
                        pa.string())
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values],
                        pa.string())


# Our own columns, with fixed types (a batch of only error rows would infer null types).
_FIXED_TYPES = {"row_id": pa.string(), "image": pa.list_(pa.string()), "status": pa.string(), "error": pa.string(),
                schema.SOURCE: pa.string(), schema.POSITION: pa.int64(), schema.REPLACES: pa.string(),
                schema.CONCEPTS: pa.list_(pa.string())}


def rows_to_table(rows: list[dict]) -> pa.Table:
    # Every key of every row becomes a column (pa.Table.from_pylist would keep only the first
    # row's keys and silently drop columns that appear later).
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({n: pa.array([r.get(n) for r in rows], _FIXED_TYPES[n]) if n in _FIXED_TYPES
                     else _column([r.get(n) for r in rows]) for n in names})


def _mark_duplicates(rows: list[dict], dup_positions: set[int]) -> None:
    """input.id_column: rows the pre-pass found to repeat an earlier row's id lose it."""
    for r in rows:
        given = r.pop("_pq_given_id", None)
        positional = r.pop("_pq_positional_id", None)
        if given is not None and r[schema.POSITION] in dup_positions:
            r.update(row_id=positional, status=schema.DUPLICATE_ROW_ID,
                     error=f"input.id_column value {given!r} is already used by an earlier row")


def _finish(rows: list[dict], dups: set[int], state: Optional[ShardState], tally: dict) -> Optional[pa.Table]:
    """Flag repeated id_column values, drop rows a previous run committed (resume), mark rows an
    error retry redoes."""
    if not rows:
        return None
    _mark_duplicates(rows, dups)
    kept = []
    for r in rows:
        if state is not None and state.is_done(r[schema.POSITION]):
            tally["resumed"] += 1
            continue
        old = retry_owner(state, r[schema.POSITION]) if state is not None and state.retry else None
        if old:
            r[schema.REPLACES] = old
            tally["retried"] += 1
        kept.append(r)
    return rows_to_table(kept) if kept else None


def read_shard(shard: str, fmt: str, opts: ReadOptions, stats=None,
               resume: Optional[ResumeOptions] = None) -> Iterator[pa.Table]:
    """Yield batches of normalized rows for one shard; report its row count (or failure) to stats.

    With `resume`, the shard's own commit state is loaded first (io/resume.py): rows done by an
    earlier run are skipped. Memory: one shard's done ranges and one block of rows."""
    state = load_shard_state(shard, resume) if resume is not None else None
    dups = load_duplicate_positions(shard, opts.dups_dir, opts.output_storage_options) if opts.id_column else set()
    tally = {"resumed": 0, "retried": 0}
    rows: list[dict] = []
    count = yielded = 0
    failure = None
    try:
        for row in _records(shard, fmt, opts, state.is_done if state is not None else _never):
            count += 1
            if row is None:
                tally["resumed"] += 1
                continue
            rows.append(row)
            if len(rows) >= opts.block_rows:
                table = _finish(rows, dups, state, tally)
                rows = []
                if table is not None:
                    yield table
                    yielded += 1
                    # Ray Data holds a task's last yielded block until the next one: from the second on, one has left.
                    if resume is not None and resume.fault and yielded >= 2:
                        crash_read_task_once(shard, resume)
    except Exception as e:  # noqa: BLE001 - a shard that cannot be parsed is reported, not fatal
        failure = f"{type(e).__name__}: {e}"
    table = _finish(rows, dups, state, tally)
    if table is not None:
        yield table
    if stats is not None:
        import ray
        extra = {"rows_resumed": tally["resumed"], "rows_retried": tally["retried"]}
        if fmt == CONCEPTS_FORMAT:
            extra["text_qa_concepts"] = count
        if state is not None:
            extra.update(records_dropped=state.records_dropped, orphan_files_removed=state.orphan_files_removed)
        ray.get(stats.shard_read.remote(shard, count, extra, failure))


def _records(shard: str, fmt: str, opts: ReadOptions, skip=_never) -> Iterator[Optional[dict]]:
    """The shard's normalized rows (None for a row an earlier run committed), whatever its format."""
    if fmt == CONCEPTS_FORMAT:
        yield from concept_records(opts.concept_rows, skip)
        return
    fs, p = filesystem(shard, opts.storage_options)
    with fs.open(p, "rb") as f:
        if fmt == "parquet":
            f = io.BytesIO(f.read()) if not hasattr(f, "seek") else f
        yield from (_jsonl_records if fmt == "jsonl" else _parquet_records)(f, shard, opts, skip)


def iter_records(shard: str, fmt: str, opts: ReadOptions) -> Iterator[dict]:
    """The shard's normalized rows, one at a time (the duplicate-id pre-pass reads only this)."""
    yield from _records(shard, fmt, opts)


def read_shards_batch(batch: dict, opts: ReadOptions, stats=None,
                      resume: Optional[ResumeOptions] = None) -> Iterator[pa.Table]:
    """map_batches UDF over the shard list: each batch holds one or more (shard, format) items."""
    for shard, fmt in zip(batch["shard"], batch["format"]):
        yield from read_shard(str(shard), str(fmt), opts, stats, resume)
