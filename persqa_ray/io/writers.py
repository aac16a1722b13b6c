"""Output side: committed Parquet files, resume bookkeeping, reading back, the run summary.

Commit protocol (why: a crash must never leave a partial file that looks complete, and a rerun
must know exactly which rows are done). Each output batch is written as one file per partition:
first under a hidden temporary name (readers skip names starting with '.'), then renamed to its
final name; on S3 a PUT is atomic, so the final name is written directly. Only after all of a
batch's files are in place is `_commits/<batch id>.json` written. A file without a commit record
is an orphan from a crash: the next run deletes it before starting, and `read_output` never
reads it. Rows whose row_id appears in committed files are done; a rerun skips them.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from persqa_ray import schema
from persqa_ray.config import ConfigError, OutputConfig
from persqa_ray.io.filesystems import filesystem, is_url

SUMMARY_FILE = "_summary.json"
COMMITS_DIR = "_commits"
RUN_FILE = "_run.json"
# Settings that decide what a row's output is: a resume with other values would mix two datasets.
RUN_IDENTITY_FIELDS = ("prompt", "engine.model", "engine.max_tokens", "engine.temperature", "engine.top_p",
                       "engine.guided_prefix", "output.pers_qa_format", "output.partition_by",
                       "input.image_column", "input.id_column", "input.concept_column",
                       "input.subject_type_column")


def _root(out_path: str, storage_options: Optional[dict]):
    fs, root = filesystem(out_path if is_url(out_path) else os.path.abspath(os.path.expanduser(out_path)),
                          storage_options)
    # fsspec reuses filesystem instances and s3fs caches listings: files written by other
    # processes since the last listing would be missed (a summary undercounted on S3 once).
    fs.invalidate_cache()
    return fs, root


def _all_files(fs, root: str) -> list[str]:
    return fs.find(root) if fs.exists(root) else []


def _committed(fs, root: str) -> Optional[set[str]]:
    """Names of committed files (relative to root); None for an output without commit records
    (written by another tool), where every Parquet file counts."""
    cdir = f"{root.rstrip('/')}/{COMMITS_DIR}"
    if not fs.exists(cdir):
        return None
    names: set[str] = set()
    for rec in fs.find(cdir):
        if rec.endswith(".json"):
            with fs.open(rec, "r") as f:
                names.update(json.load(f)["files"])
    return names


def _data_files(fs, root: str) -> list[str]:
    root = root.rstrip("/")
    files = [f for f in _all_files(fs, root) if f.endswith(".parquet")
             and not os.path.basename(f).startswith((".", "_"))]
    committed = _committed(fs, root)
    if committed is None:
        return files
    return [f for f in files if f[len(root) + 1:] in committed]


def run_identity(cfg) -> dict:
    dumped = cfg.model_dump(mode="json")
    ident = {}
    for field in RUN_IDENTITY_FIELDS:
        node = dumped
        for k in field.split("."):
            node = node[k]
        ident[field] = node
    return ident


@dataclass
class Resume:
    done_row_ids: list[str]
    orphans_removed: int


def prepare_output(cfg) -> Resume:
    """Start over (overwrite), or resume: check the earlier run asked the same questions the same way,
    delete orphan files of a crashed batch, and return the row ids already done."""
    out = cfg.output
    fs, root = _root(out.path, out.storage_options)
    root = root.rstrip("/")
    if out.overwrite and fs.exists(root):
        fs.rm(root, recursive=True)
    if not is_url(out.path):
        os.makedirs(root, exist_ok=True)
    ident = run_identity(cfg)
    run_file = f"{root}/{RUN_FILE}"
    files = _all_files(fs, root)
    if fs.exists(run_file):
        with fs.open(run_file, "r") as f:
            before = json.load(f)
        changed = [k for k in RUN_IDENTITY_FIELDS if before.get(k) != ident[k]]
        if changed:
            raise ConfigError(f"output.path: {out.path} holds a run made with other settings ({', '.join(changed)}); "
                              "resuming would mix two datasets: use another path or --overwrite")
    elif any(f.endswith(".parquet") for f in files):
        raise ConfigError(f"output.path: {out.path} holds Parquet files persqa-ray did not write; "
                          "use another path or --overwrite")
    else:
        with fs.open(run_file, "w") as f:
            json.dump(ident, f, indent=2)
    committed = _committed(fs, root) or set()
    orphans = [f for f in files if (f.endswith(".parquet") and f[len(root) + 1:] not in committed)
               or f.endswith(".parquet.tmp")]
    for f in orphans:
        fs.rm(f)
    done = read_output(out.path, ["row_id"], out.storage_options).column("row_id").to_pylist()
    return Resume(done_row_ids=done, orphans_removed=len(orphans))


@dataclass(frozen=True)
class WriteOptions:
    path: str                      # output.path as configured (local path or URL)
    storage_options: dict
    partition_by: tuple[str, ...]


def _partition_dir(names: tuple[str, ...], values: tuple) -> str:
    parts = []
    for n, v in zip(names, values):
        v = "__HIVE_DEFAULT_PARTITION__" if v is None else urllib.parse.quote(str(v), safe="")
        parts.append(f"{n}={v}")
    return "/".join(parts)


def write_committed(batch: pa.Table, opts: WriteOptions) -> pa.Table:
    """map_batches UDF: write one batch as committed files; returns a one-row count table."""
    if batch.num_rows == 0:
        return pa.table({"rows": pa.array([], pa.int64())})
    fs, root = _root(opts.path, opts.storage_options)
    root = root.rstrip("/")
    url = is_url(opts.path)
    # The batch id is a digest of the rows' keys: a write task that Ray retries after it had already
    # committed (its worker died before reporting back) finds its own commit and writes nothing.
    keys = sorted(zip(batch.column("row_id").to_pylist(), batch.column("qa_index").to_pylist()))
    uid = hashlib.blake2b(repr(keys).encode(), digest_size=16).hexdigest()
    commit = f"{root}/{COMMITS_DIR}/{uid}.json"
    if fs.exists(commit):
        return pa.table({"rows": [0]})
    names = tuple(opts.partition_by)
    if names:
        groups: dict[tuple, list[int]] = {}
        for i, part in enumerate(batch.select(list(names)).to_pylist()):
            groups.setdefault(tuple(part[n] for n in names), []).append(i)
    else:
        groups = {(): list(range(batch.num_rows))}
    written = []
    for j, (values, idx) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        sub = batch.take(pa.array(idx, pa.int64())).drop_columns(list(names))
        rel = "/".join(x for x in (_partition_dir(names, values), f"part-{uid}-{j}.parquet") if x)
        final = f"{root}/{rel}"
        fs.makedirs(os.path.dirname(final), exist_ok=True)
        if url:  # an object store PUT is atomic: never visible half-written
            with fs.open(final, "wb") as f:
                pq.write_table(sub, f)
        else:
            tmp = f"{os.path.dirname(final)}/.part-{uid}-{j}.parquet.tmp"
            with fs.open(tmp, "wb") as f:
                pq.write_table(sub, f)
            fs.mv(tmp, final)
        written.append(rel)
    fs.makedirs(f"{root}/{COMMITS_DIR}", exist_ok=True)
    with fs.open(commit, "w") as f:
        json.dump({"files": written, "rows": batch.num_rows, "committed_at": round(time.time(), 3)}, f)
    return pa.table({"rows": [batch.num_rows]})


def read_output(path: str, columns: Optional[list[str]] = None,
                storage_options: Optional[dict] = None) -> pa.Table:
    """The output dataset as one table (hive partition columns restored, schemas unified)."""
    fs, root = _root(path, storage_options)
    files = _data_files(fs, root)
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in (columns or ["row_id"])})
    # Local output: Arrow's own filesystem. Wrapping fsspec's local fs in a PyFileSystem makes
    # Arrow's IO threads call back into Python, which can abort the interpreter at exit
    # ("terminate called without an active exception", seen in the export CLI).
    pfs = pafs.LocalFileSystem() if not is_url(path) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    part = pads.partitioning(flavor="hive")
    d = pads.dataset(files, filesystem=pfs, format="parquet", partitioning=part, partition_base_dir=root)
    schemas = [pads.dataset(f, filesystem=pfs, format="parquet").schema for f in files]
    unified = pa.unify_schemas(schemas + [d.schema], promote_options="permissive")
    d = pads.dataset(files, filesystem=pfs, format="parquet", partitioning=part,
                     partition_base_dir=root, schema=unified)
    cols = [c for c in columns if c in unified.names] if columns else None
    return d.to_table(columns=cols)


def _counts(t: pa.Table, column: str, where: Optional[pa.Array] = None) -> dict[str, int]:
    if column not in t.column_names or not t.num_rows:
        return {}
    col = t.column(column) if where is None else t.column(column).filter(where)
    return {str(r["values"]): int(r["counts"]) for r in pc.value_counts(col).to_pylist()
            if r["values"] is not None}


def personalization_summary(t: pa.Table) -> dict[str, Any]:
    """QA rows by type, rows by where their subject type came from, recognition labels and the
    VLM's disagreements with them (recognition_check)."""
    if "qa_type" not in t.column_names or not t.num_rows:
        return {}
    ok = pc.equal(t.column("status"), schema.OK)
    first = pc.equal(t.column("qa_index"), 0)  # one row per input row
    recognition = pc.and_(ok, pc.equal(t.column("qa_type"), "recognition"))
    checked = pc.and_(recognition, pc.is_valid(t.column("model_label")))
    disagree = pc.sum(pc.cast(pc.not_equal(t.column("label").filter(checked),
                                           t.column("model_label").filter(checked)), pa.int64())).as_py()
    return {
        "qa_rows_by_type": _counts(t, "qa_type", ok),
        "rows_by_subject_type": _counts(t, "subject_type", first),
        "rows_by_subject_type_source": _counts(t, "subject_type_source", first),
        "recognition_labels": _counts(t, "label", recognition),
        "recognition_checked": int(pc.sum(pc.cast(checked, pa.int64())).as_py() or 0),
        "recognition_disagreements": int(disagree or 0),
        "questions_by_template": _counts(t, "template_id", ok),
    }


def summarize(out: OutputConfig, stats: dict[str, Any], seconds: float, model: str,
              orphans_removed: int = 0, warnings: Optional[list[str]] = None) -> dict[str, Any]:
    """Counts from what is actually on disk, checked against what the readers saw."""
    t = read_output(out.path, ["row_id", "qa_index", "status", "question", "num_input_tokens",
                               "num_output_tokens", "qa_type", "subject_type", "subject_type_source",
                               "label", "model_label", "template_id"], out.storage_options)
    status = t.column("status")
    ok = pc.equal(status, schema.OK)
    per_row = pa.table({"row_id": t.column("row_id"), "ok": pc.cast(ok, pa.int8())}).group_by("row_id") \
        .aggregate([("ok", "min")])
    rows_ok = int(pc.sum(per_row.column("ok_min")).as_py() or 0)
    rows_out = per_row.num_rows
    keys = pa.table({"row_id": t.column("row_id"), "qa_index": t.column("qa_index")})
    duplicates = t.num_rows - keys.group_by(["row_id", "qa_index"]).aggregate([]).num_rows
    by_status = {r["status"]: r["count"] for r in
                 t.select(["status"]).group_by("status").aggregate([("status", "count")])
                 .rename_columns(["status", "count"]).to_pylist()}
    qa_rows = int(pc.sum(pc.is_valid(t.column("question"))).as_py() or 0) if t.num_rows else 0
    in_tok = int(pc.sum(t.column("num_input_tokens")).as_py() or 0) if t.num_rows else 0
    out_tok = int(pc.sum(t.column("num_output_tokens")).as_py() or 0) if t.num_rows else 0
    rows_in = int(stats.get("rows_in", 0))
    return {
        "rows_in": rows_in,
        "rows_resumed": int(stats.get("rows_resumed", 0)),
        "rows_ok": rows_ok,
        "rows_error": rows_out - rows_ok,
        "consistent": rows_in == rows_out,
        "qa_rows": qa_rows,
        "qa_rows_ok": by_status.get(schema.OK, 0),
        "errors_by_status": {k: v for k, v in sorted(by_status.items()) if k != schema.OK},
        "duplicates": duplicates,
        "shards": stats.get("shards", 0),
        "shard_errors": stats.get("shard_errors", {}),
        "engine_restarts": stats.get("engine_restarts", 0),
        "nodes": stats.get("nodes", {}),
        "max_batches_in_flight": stats.get("max_batches_in_flight", 1 if t.num_rows else 0),
        "orphan_files_removed": orphans_removed,
        "model": model,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows_in / seconds, 3) if seconds > 0 else None,
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "output_tokens_per_second": round(out_tok / seconds, 1) if seconds > 0 else None,
        "output_path": out.path,
        **personalization_summary(t),
        "warnings": list(warnings or []),
    }


def write_summary(out: OutputConfig, summary: dict[str, Any]) -> str:
    fs, root = _root(out.path, out.storage_options)
    path = f"{root.rstrip('/')}/{SUMMARY_FILE}"
    with fs.open(path, "w") as f:
        f.write(json.dumps(summary, indent=2, ensure_ascii=False))
    return path


def human_summary(s: dict[str, Any]) -> str:
    lines = [
        f"rows in {s['rows_in']}  ok {s['rows_ok']}  error {s['rows_error']}  "
        f"(rows_in == rows_ok + rows_error: {s['rows_in'] == s['rows_ok'] + s['rows_error']})",
        f"QA rows {s['qa_rows']} ({s['qa_rows_ok']} ok)  duplicates {s['duplicates']}",
    ]
    if s.get("rows_resumed"):
        lines.append(f"resumed: {s['rows_resumed']} rows were done by an earlier run and skipped")
    if s["errors_by_status"]:
        lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in s["errors_by_status"].items()))
    if s.get("qa_rows_by_type"):
        lines.append("QA by type: " + ", ".join(f"{k}={v}" for k, v in s["qa_rows_by_type"].items())
                     + "  subject types: " + ", ".join(f"{k}={v}" for k, v in s["rows_by_subject_type"].items())
                     + "  (from " + ", ".join(f"{k}={v}" for k, v in s["rows_by_subject_type_source"].items()) + ")")
    if s.get("recognition_labels"):
        lines.append("recognition labels: " + ", ".join(f"{k}={v}" for k, v in s["recognition_labels"].items())
                     + (f"  VLM disagreed on {s['recognition_disagreements']} of {s['recognition_checked']}"
                        if s.get("recognition_checked") else ""))
    for w in s.get("warnings", []):
        lines.append(f"warning: {w}")
    if s["shard_errors"]:
        lines.append("unreadable shards: " + "; ".join(f"{k}: {v}" for k, v in s["shard_errors"].items()))
    lines.append(f"{s['seconds']} s, {s['rows_per_second']} rows/s, "
                 f"{s['output_tokens_per_second']} output tokens/s, model {s['model']}")
    lines.append(f"output: {s['output_path']}")
    return "\n".join(lines)
