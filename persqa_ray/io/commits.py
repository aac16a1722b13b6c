"""The commit protocol: how a block of output rows becomes durable, exactly once.

A *unit* is the rows of one output block that came from one input shard. Each unit is written as
one Parquet file per partition, in four steps:

1. `_commits/<shard key>/<uid>.pending` names the files about to be written (our intent: after a
   crash the next run deletes exactly these files, nothing else);
2. each file is written under a hidden temporary name (`.part-….tmp`), then renamed into place
   (an object-store PUT is atomic, so on S3 the final name is written directly);
3. `_commits/<shard key>/<uid>.json`, the *record*, is written: it lists its files with their
   sizes, the shard positions of its input rows as compact ranges, the positions of rows that
   ended with an error status, and the unit's counts (rows by status, QA rows by type, tokens…);
4. the `.pending` file is removed.

A record is trusted only when every file it lists is there with its size; otherwise its files are
deleted and its rows redone. The uid is a digest of (shard, positions): a write that Ray retries
after it had committed finds its record and writes nothing. Records live under their shard's key,
so a read task loads only its own shard's state (io/resume.py) and nothing that grows with the
dataset is built on the driver. The run summary is a fold over records (io/summary.py).

Intents and records name the run that wrote them (its lease owner id), and so do the temporary
names of both: a read task that Ray re-executes mid-run (a retry after its worker died, or lineage
reconstruction) loads the state earlier runs left and never touches this run's commits in flight
(io/resume.py), so it yields exactly what its first attempt did, as Ray requires of a retried
streaming task.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from persqa_ray import schema
from persqa_ray.io.filesystems import filesystem, is_url

COMMITS_DIR = "_commits"
RECORD_VERSION = 2
# Fault injection for the crash tests: PERSQA_FAULT=<step>[@N] in the driver's environment makes
# the writer kill the whole run (driver included) at that step of the commit protocol, once at
# least N records exist. Steps, in protocol order:
FAULT_STEPS = ("after_pending", "after_tmp", "after_rename", "after_record")


def output_root(path: str, storage_options: Optional[dict]):
    """(fs, root without trailing '/') of an output; fsspec's listing cache dropped, because files
    written by other processes since the last listing would be missed (an S3 summary once was)."""
    fs, root = filesystem(path if is_url(path) else os.path.abspath(os.path.expanduser(path)), storage_options)
    fs.invalidate_cache()
    return fs, root.rstrip("/")


def shard_key(shard: str) -> str:
    return hashlib.blake2b(shard.encode(), digest_size=8).hexdigest()


def shard_dir(root: str, shard: str) -> str:
    return f"{root}/{COMMITS_DIR}/{shard_key(shard)}"


# -- position ranges: a shard's done rows as [start, end) pairs, compact for contiguous blocks ----
def to_ranges(positions) -> list[list[int]]:
    out: list[list[int]] = []
    for p in sorted(set(int(x) for x in positions)):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return out


def merge_ranges(ranges) -> list[list[int]]:
    out: list[list[int]] = []
    for s, e in sorted((int(s), int(e)) for s, e in ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def ranges_len(ranges) -> int:
    return sum(e - s for s, e in ranges)


# -- per-unit counts (additive: the summary is their sum) ------------------------------------------
def _value_counts(col: pa.ChunkedArray, where=None) -> dict[str, int]:
    if where is not None:
        col = col.filter(where)
    return {str(r["values"]): int(r["counts"]) for r in pc.value_counts(col).to_pylist() if r["values"] is not None}


def unit_counts(t: pa.Table) -> dict[str, Any]:
    """What the summary needs from one unit's output rows."""
    status = t.column("status")
    ok = pc.equal(status, schema.OK)
    per_row = pa.table({"row_id": t.column("row_id"), "ok": pc.cast(ok, pa.int8()),
                        "eng": pc.cast(pc.equal(status, schema.ENGINE_ERROR), pa.int8()),
                        "gen": pc.cast(pc.is_valid(t.column("question")), pa.int8())}) \
        .group_by("row_id").aggregate([("ok", "min"), ("eng", "max"), ("gen", "max")])
    first = pc.equal(t.column("qa_index"), 0)
    recognition = pc.and_(ok, pc.equal(t.column("qa_type"), "recognition"))
    checked = pc.and_(recognition, pc.is_valid(t.column("model_label")))
    disagree = pc.sum(pc.cast(pc.not_equal(t.column("label").filter(checked),
                                           t.column("model_label").filter(checked)), pa.int64())).as_py()
    return {
        "rows": per_row.num_rows,
        "rows_ok": int(pc.sum(per_row.column("ok_min")).as_py() or 0),
        "rows_engine_error": int(pc.sum(per_row.column("eng_max")).as_py() or 0),
        "rows_generated": int(pc.sum(per_row.column("gen_max")).as_py() or 0),
        "qa_rows": int(pc.sum(pc.cast(pc.is_valid(t.column("question")), pa.int64())).as_py() or 0),
        "by_status": _value_counts(status),
        "input_tokens": int(pc.sum(t.column("num_input_tokens")).as_py() or 0),
        "output_tokens": int(pc.sum(t.column("num_output_tokens")).as_py() or 0),
        "qa_rows_by_type": _value_counts(t.column("qa_type"), ok),
        "rows_by_subject_type": _value_counts(t.column("subject_type"), first),
        "rows_by_subject_type_source": _value_counts(t.column("subject_type_source"), first),
        "recognition_labels": _value_counts(t.column("label"), recognition),
        "negatives_by_kind": _value_counts(t.column("negative_kind"), pc.and_(recognition, pc.equal(t.column("label"),
                                                                                                   "no"))),
        "recognition_checked": int(pc.sum(pc.cast(checked, pa.int64())).as_py() or 0),
        "recognition_disagreements": int(disagree or 0),
        "questions_by_template": _value_counts(t.column("template_id"), ok),
    }


def add_counts(total: dict, part: dict) -> dict:
    """total += part, recursively (dicts of ints)."""
    for k, v in part.items():
        if isinstance(v, dict):
            add_counts(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v
    return total


def _error_positions(t: pa.Table, positions: pa.ChunkedArray) -> dict[str, list[list[int]]]:
    """Shard positions of input rows with a non-ok QA row, by status (what --retry-errors redoes)."""
    bad = pc.not_equal(t.column("status"), schema.OK)
    if not pc.any(bad).as_py():
        return {}
    out: dict[str, list] = {}
    for st, pos in zip(t.column("status").filter(bad).to_pylist(), positions.filter(bad).to_pylist()):
        out.setdefault(st, []).append(pos)
    return {st: to_ranges(p) for st, p in out.items()}


# -- writing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WriteOptions:
    path: str                      # output.path as configured (local path or URL)
    storage_options: dict
    partition_by: tuple[str, ...]
    fault: Optional[str] = None    # PERSQA_FAULT of the driver (tests only)
    driver_pid: int = 0
    run_id: str = ""               # the run's lease owner id, written into its intents and records


def _partition_dir(names: tuple[str, ...], values: tuple) -> str:
    parts = []
    for n, v in zip(names, values):
        v = "__HIVE_DEFAULT_PARTITION__" if v is None else urllib.parse.quote(str(v), safe="")
        parts.append(f"{n}={v}")
    return "/".join(parts)


def _maybe_fault(opts: WriteOptions, step: str, fs, root: str) -> None:
    if not opts.fault:
        return
    want, _, at = opts.fault.partition("@")
    if want != step:
        return
    if at and len(fs.glob(f"{root}/{COMMITS_DIR}/*/*.json")) < int(at):
        return
    # The whole run dies here, as a power cut would: the driver first, then this worker.
    if opts.driver_pid:
        try:
            os.kill(opts.driver_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(17)


def _write_file(fs, table: pa.Table, final: str, url: bool, between=lambda: None) -> None:
    fs.makedirs(os.path.dirname(final), exist_ok=True)
    if url:  # an object-store PUT is atomic: never visible half-written
        with fs.open(final, "wb") as f:
            pq.write_table(table, f)
        return
    tmp = f"{os.path.dirname(final)}/.{os.path.basename(final)}.tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    between()  # the fault point between the temporary write and its rename
    fs.mv(tmp, final)


def _write_json(fs, path: str, obj: Any, url: bool, run_id: str = "") -> None:
    """Atomic JSON write: tmp + rename locally, one PUT on an object store. The temporary name
    carries the writing run's id, so a cleanup knows a temporary file of its own run in flight."""
    data = json.dumps(obj, ensure_ascii=False)
    if url:
        with fs.open(path, "w") as f:
            f.write(data)
        return
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}{'.' + run_id if run_id else ''}.tmp"
    with fs.open(tmp, "w") as f:
        f.write(data)
    fs.mv(tmp, path)


def commit_unit(fs, root: str, shard: str, unit: pa.Table, opts: WriteOptions) -> int:
    """Write one unit (rows of one shard) through the protocol; returns rows written (0: done before)."""
    positions = unit.column(schema.POSITION)
    ranges = to_ranges(positions.to_pylist())
    replaces = unit.column(schema.REPLACES) if schema.REPLACES in unit.column_names else None
    olds = sorted(x for x in pc.unique(replaces).to_pylist() if x) if replaces is not None else []
    uid = hashlib.blake2b(f"{shard}\x00{ranges}\x00{olds}".encode(), digest_size=16).hexdigest()
    sdir = shard_dir(root, shard)
    record_path = f"{sdir}/{uid}.json"
    if fs.exists(record_path):
        return 0
    url = is_url(opts.path)
    errors = _error_positions(unit, positions)
    supersedes = {old: _superseded_rows(fs, root, sdir, old, unit.filter(pc.equal(replaces, old))) for old in olds}
    data = unit.drop_columns([c for c in schema.WRITER_COLUMNS if c in unit.column_names])
    names = tuple(opts.partition_by)
    if names:
        groups: dict[tuple, list[int]] = {}
        for i, part in enumerate(data.select(list(names)).to_pylist()):
            groups.setdefault(tuple(part[n] for n in names), []).append(i)
    else:
        groups = {(): list(range(data.num_rows))}
    plan = []
    for j, (values, idx) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        rel = "/".join(x for x in (_partition_dir(names, values), f"part-{shard_key(shard)}-{uid}-{j}.parquet") if x)
        plan.append((rel, data.take(pa.array(idx, pa.int64())).drop_columns(list(names))))
    fs.makedirs(sdir, exist_ok=True)
    _write_json(fs, f"{sdir}/{uid}.pending", {"files": [rel for rel, _ in plan], "run": opts.run_id}, url, opts.run_id)
    _maybe_fault(opts, "after_pending", fs, root)
    files = []
    for rel, table in plan:
        _write_file(fs, table, f"{root}/{rel}", url, lambda: _maybe_fault(opts, "after_tmp", fs, root))
        files.append({"path": rel, "size": int(fs.info(f"{root}/{rel}")["size"]), "rows": table.num_rows})
        _maybe_fault(opts, "after_rename", fs, root)
    record = {"version": RECORD_VERSION, "uid": uid, "shard": shard, "files": files, "ranges": ranges, "errors": errors,
              "counts": unit_counts(unit), "committed_at": round(time.time(), 3), "run": opts.run_id}
    if supersedes:
        record["supersedes"] = supersedes
    _write_json(fs, record_path, record, url, opts.run_id)
    _maybe_fault(opts, "after_record", fs, root)
    fs.rm(f"{sdir}/{uid}.pending")
    return unit.num_rows


def _superseded_rows(fs, root: str, sdir: str, old_uid: str, new_rows: pa.Table) -> dict:
    """What the new rows replace in record `old_uid`: their row ids, positions, and the old rows'
    counts (the summary subtracts them). The old rows stay in their files; readers hide them."""
    row_ids = sorted(set(new_rows.column("row_id").to_pylist()))
    old = read_json(fs, f"{sdir}/{old_uid}.json") or {"files": []}
    tables = [read_data_file(fs, root, f["path"]) for f in old["files"]]
    tables = [t.filter(pc.is_in(t.column("row_id"), pa.array(row_ids, pa.string()))) for t in tables]
    gone = pa.concat_tables(tables, promote_options="permissive") if tables else None
    return {"row_ids": row_ids, "ranges": to_ranges(new_rows.column(schema.POSITION).to_pylist()),
            "counts": unit_counts(_with_defaults(gone)) if gone is not None and gone.num_rows else {}}


_DEFAULT_PARTITION = "__HIVE_DEFAULT_PARTITION__"


def partition_values(rel: str) -> dict[str, Optional[str]]:
    """Hive partition values of a data file, as the strings they were written from (reading them
    as strings keeps `concept=001` the text "001"; inference would make it the integer 1)."""
    out = {}
    for seg in rel.split("/")[:-1]:
        if "=" in seg:
            k, v = seg.split("=", 1)
            v = urllib.parse.unquote(v)
            out[k] = None if v == _DEFAULT_PARTITION else v
    return out


def read_data_file(fs, root: str, rel: str, columns: Optional[list[str]] = None) -> pa.Table:
    """One committed data file with its partition columns restored."""
    with fs.open(f"{root}/{rel}", "rb") as f:
        t = pq.read_table(f)
    for k, v in partition_values(rel).items():
        if k not in t.column_names:
            t = t.append_column(k, pa.array([v] * t.num_rows, pa.string()))
    if columns:
        t = t.select([c for c in columns if c in t.column_names])
    return t


def _with_defaults(t: pa.Table) -> pa.Table:
    """unit_counts needs our columns; a partition column other than status is not in the files."""
    for f in schema.OUTPUT_FIELDS:
        if f.name not in t.column_names:
            t = t.append_column(f.name, pa.nulls(t.num_rows, f.type))
    return t


def write_committed(batch: pa.Table, opts: WriteOptions) -> pa.Table:
    """map_batches UDF: commit one output block, one unit per shard it holds; returns a count."""
    if batch.num_rows == 0:
        return pa.table({"rows": pa.array([], pa.int64())})
    fs, root = output_root(opts.path, opts.storage_options)
    written = 0
    sources = batch.column(schema.SOURCE)
    for shard in pc.unique(sources).to_pylist():
        unit = batch.filter(pc.equal(sources, shard))
        written += commit_unit(fs, root, shard, unit, opts)
    return pa.table({"rows": [written]})


# -- reading records ------------------------------------------------------------------------------
def read_json(fs, path: str) -> Optional[dict]:
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def record_files_present(fs, root: str, record: dict) -> bool:
    """A record is trusted only with all of its files, each of its recorded size."""
    for f in record.get("files", []):
        try:
            if int(fs.info(f"{root}/{f['path']}")["size"]) != int(f["size"]):
                return False
        except FileNotFoundError:
            return False
    return True


def shard_dirs(fs, root: str) -> list[str]:
    cdir = f"{root}/{COMMITS_DIR}"
    if not fs.exists(cdir):
        return []
    return sorted(p for p in fs.ls(cdir, detail=False) if not os.path.basename(p.rstrip("/")).startswith("."))


def iter_records(fs, root: str, validate: bool = True) -> Iterator[dict]:
    """Every trusted record of an output, one shard directory at a time (the driver holds one
    record at a time; the listing of one shard's records is all that is kept)."""
    for sdir in shard_dirs(fs, root):
        for path in sorted(fs.ls(sdir, detail=False)):
            if not path.endswith(".json") or os.path.basename(path).startswith("."):
                continue
            rec = read_json(fs, path)
            if rec is None or rec.get("version") != RECORD_VERSION:
                continue
            if validate and not record_files_present(fs, root, rec):
                continue
            yield rec
