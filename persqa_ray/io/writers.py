"""Output side: where the dataset goes, reading it back, and the run summary (_summary.json)."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from persqa_ray import schema
from persqa_ray.config import ConfigError, OutputConfig
from persqa_ray.io.filesystems import filesystem, is_url

SUMMARY_FILE = "_summary.json"


def output_filesystem(out: OutputConfig) -> tuple[Optional[pafs.FileSystem], str]:
    """(pyarrow filesystem or None for local, root path) for Ray's and pyarrow's writers/readers."""
    if not is_url(out.path):
        return None, os.path.abspath(os.path.expanduser(out.path))
    fs, root = filesystem(out.path, out.storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root


def _data_files(fs, root: str) -> list[str]:
    if not fs.exists(root):
        return []
    return [f for f in fs.find(root) if f.endswith(".parquet")]


def prepare_output(out: OutputConfig) -> None:
    """Refuse to mix a new run into an existing dataset unless told to overwrite it."""
    fs, root = filesystem(out.path if is_url(out.path) else os.path.abspath(out.path), out.storage_options)
    existing = _data_files(fs, root)
    if existing and not out.overwrite:
        raise ConfigError(f"output.path: {out.path} already holds a dataset ({len(existing)} Parquet "
                          "files); choose another path or set output.overwrite=true")
    if existing or (out.overwrite and fs.exists(root)):
        fs.rm(root, recursive=True)
    if not is_url(out.path):
        os.makedirs(root, exist_ok=True)


def read_output(path: str, columns: Optional[list[str]] = None,
                storage_options: Optional[dict] = None) -> pa.Table:
    """The output dataset as one table (hive partition columns restored, schemas unified)."""
    fs, root = filesystem(path if is_url(path) else os.path.abspath(path), storage_options)
    files = _data_files(fs, root)
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in (columns or ["row_id"])})
    pfs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    part = pads.partitioning(flavor="hive")
    d = pads.dataset(files, filesystem=pfs, format="parquet", partitioning=part, partition_base_dir=root)
    schemas = [pads.dataset(f, filesystem=pfs, format="parquet").schema for f in files]
    unified = pa.unify_schemas(schemas + [d.schema], promote_options="permissive")
    d = pads.dataset(files, filesystem=pfs, format="parquet", partitioning=part,
                     partition_base_dir=root, schema=unified)
    cols = [c for c in columns if c in unified.names] if columns else None
    return d.to_table(columns=cols)


def summarize(out: OutputConfig, stats: dict[str, Any], seconds: float, model: str) -> dict[str, Any]:
    """Counts from what is actually on disk, checked against what the readers saw."""
    t = read_output(out.path, ["row_id", "qa_index", "status", "question", "num_input_tokens",
                               "num_output_tokens"], out.storage_options)
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
        "model": model,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows_in / seconds, 3) if seconds > 0 else None,
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "output_tokens_per_second": round(out_tok / seconds, 1) if seconds > 0 else None,
        "output_path": out.path,
    }


def write_summary(out: OutputConfig, summary: dict[str, Any]) -> str:
    fs, root = filesystem(out.path if is_url(out.path) else os.path.abspath(out.path), out.storage_options)
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
    if s["errors_by_status"]:
        lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in s["errors_by_status"].items()))
    if s["shard_errors"]:
        lines.append("unreadable shards: " + "; ".join(f"{k}: {v}" for k, v in s["shard_errors"].items()))
    lines.append(f"{s['seconds']} s, {s['rows_per_second']} rows/s, "
                 f"{s['output_tokens_per_second']} output tokens/s, model {s['model']}")
    lines.append(f"output: {s['output_path']}")
    return "\n".join(lines)
