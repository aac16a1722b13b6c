"""The run summary: a fold over the output's commit records (no Parquet file is read to count).

Each record carries its unit's counts; the summary adds them up, one shard directory at a time,
so the driver holds one shard's ranges at most. `duplicates` counts input rows committed twice
(overlapping position ranges within a shard): 0 unless the commit protocol was broken.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from persqa_ray import schema
from persqa_ray.config import OutputConfig
from persqa_ray.io.commits import (
    RECORD_VERSION,
    add_counts,
    merge_ranges,
    output_root,
    ranges_len,
    read_json,
    record_files_present,
    shard_dirs,
)
from persqa_ray.io.filesystems import is_url
from persqa_ray.io.outputs import SUMMARY_FILE


def _sub_counts(total: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            _sub_counts(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) - v


def fold_records(path: str, storage_options: Optional[dict] = None, validate: bool = True) -> dict[str, Any]:
    """Sum of every trusted record's counts, the superseded rows of error retries taken out.
    `validate`: check each record's files (a stat each; on an object store a request each, so
    the end-of-run summary there relies on the read tasks having checked them at the start)."""
    fs, root = output_root(path, storage_options)
    total: dict[str, Any] = {"records": 0, "duplicates": 0, "rows_retried": 0}
    for sdir in shard_dirs(fs, root):
        recs = {}
        for p in sorted(fs.ls(sdir, detail=False)):
            if not p.endswith(".json") or p.rsplit("/", 1)[-1].startswith("."):
                continue
            rec = read_json(fs, p)
            if rec is None or rec.get("version") != RECORD_VERSION or \
                    (validate and not record_files_present(fs, root, rec)):
                continue
            recs[rec["uid"]] = rec
        ranges, superseded = [], []
        for rec in recs.values():  # one shard's records at a time
            total["records"] += 1
            add_counts(total.setdefault("counts", {}), rec["counts"])
            ranges += rec["ranges"]
            for old, sup in rec.get("supersedes", {}).items():
                if old not in recs:
                    continue  # the replaced record is gone (dropped): nothing of it is counted
                _sub_counts(total["counts"], sup["counts"])
                superseded += sup["ranges"]
                total["rows_retried"] += ranges_len(sup["ranges"])
        committed = ranges_len(ranges) - ranges_len(superseded)
        total["duplicates"] += committed - ranges_len(merge_ranges(ranges))
    total.setdefault("counts", {})
    return total


def _clean(d: dict) -> dict:
    return {k: v for k, v in sorted(d.items()) if v}


def summarize(out: OutputConfig, stats: dict[str, Any], seconds: float, model: str,
              orphans_removed: int = 0, warnings: Optional[list[str]] = None,
              max_error_fraction: Optional[float] = None) -> dict[str, Any]:
    """The whole output's counts (a fold over records), checked against what the readers saw."""
    fold = fold_records(out.path, out.storage_options, validate=not is_url(out.path))
    c = fold["counts"]
    by_status = _clean(c.get("by_status", {}))
    rows_out, rows_ok = c.get("rows", 0), c.get("rows_ok", 0)
    rows_in = int(stats.get("rows_in", 0))
    generated = c.get("rows_generated", 0)
    engine_fraction = round(c.get("rows_engine_error", 0) / generated, 4) if generated else 0.0
    out_tok = c.get("output_tokens", 0)
    summary = {
        "rows_in": rows_in,
        "rows_resumed": int(stats.get("rows_resumed", 0)),
        "rows_retried": int(stats.get("rows_retried", 0)),
        "rows_ok": rows_ok,
        "rows_error": rows_out - rows_ok,
        "consistent": rows_in == rows_out,
        "qa_rows": c.get("qa_rows", 0),
        "qa_rows_ok": by_status.get(schema.OK, 0),
        "errors_by_status": {k: v for k, v in by_status.items() if k != schema.OK},
        "duplicates": fold["duplicates"],
        "engine_error_fraction": engine_fraction,
        "shards": stats.get("shards", 0),
        "windows": stats.get("windows", 1),
        "shard_errors": stats.get("shard_errors", {}),
        "engine_restarts": stats.get("engine_restarts", 0),
        "engine_actor_exits": stats.get("engine_actor_exits", 0),
        "nodes": stats.get("nodes", {}),
        "max_batches_in_flight": stats.get("max_batches_in_flight", 1 if rows_out else 0),
        "commit_records": fold["records"],
        "commit_records_dropped": int(stats.get("records_dropped", 0)),
        "orphan_files_removed": orphans_removed + int(stats.get("orphan_files_removed", 0)),
        "model": model,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows_in / seconds, 3) if seconds > 0 else None,
        "input_tokens": c.get("input_tokens", 0),
        "output_tokens": out_tok,
        "output_tokens_per_second": round(out_tok / seconds, 1) if seconds > 0 else None,
        "output_path": out.path,
        "warnings": list(warnings or []),
    }
    if c.get("qa_rows_by_type"):
        summary.update({k: _clean(c.get(k, {})) for k in (
            "qa_rows_by_type", "rows_by_subject_type", "rows_by_subject_type_source", "recognition_labels",
            "negatives_by_kind", "questions_by_template")})
        summary["text_qa_concepts"] = int(stats.get("text_qa_concepts", 0))
        summary["recognition_checked"] = c.get("recognition_checked", 0)
        summary["recognition_disagreements"] = c.get("recognition_disagreements", 0)
    if max_error_fraction is not None and generated and engine_fraction > max_error_fraction:
        summary["failed"] = (f"{c.get('rows_engine_error', 0)} of {generated} generated rows "
                             f"({engine_fraction:.0%}) ended with engine_error, over run.max_error_fraction="
                             f"{max_error_fraction}; rerun with --retry-errors once the engine is healthy")
    return summary


def write_summary(out: OutputConfig, summary: dict[str, Any]) -> str:
    fs, root = output_root(out.path, out.storage_options)
    path = f"{root}/{SUMMARY_FILE}"
    with fs.open(path, "w") as f:
        f.write(json.dumps(summary, indent=2, ensure_ascii=False))
    return path


def read_summary(path: str, storage_options: Optional[dict] = None) -> dict[str, Any]:
    fs, root = output_root(path, storage_options)
    return read_json(fs, f"{root}/{SUMMARY_FILE}") or {}


def human_summary(s: dict[str, Any]) -> str:
    lines = [
        f"rows in {s['rows_in']}  ok {s['rows_ok']}  error {s['rows_error']}  "
        f"(rows_in == rows_ok + rows_error: {s['rows_in'] == s['rows_ok'] + s['rows_error']})",
        f"QA rows {s['qa_rows']} ({s['qa_rows_ok']} ok)  duplicates {s['duplicates']}",
    ]
    if s.get("rows_resumed"):
        lines.append(f"resumed: {s['rows_resumed']} rows were done by an earlier run and skipped")
    if s.get("rows_retried"):
        lines.append(f"retried: {s['rows_retried']} error rows were generated again and replaced")
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
    if s.get("negatives_by_kind"):
        lines.append("'No' pairs asked about: " + ", ".join(f"{k}={v}" for k, v in s["negatives_by_kind"].items()))
    if s.get("text_qa_concepts"):
        lines.append(f"text-only QA: {s['text_qa_concepts']} concept(s) (counted in rows in)")
    for w in s.get("warnings", []):
        lines.append(f"warning: {w}")
    if s["shard_errors"]:
        lines.append("unreadable shards: " + "; ".join(f"{k}: {v}" for k, v in s["shard_errors"].items()))
    if s.get("commit_records_dropped") or s.get("orphan_files_removed"):
        lines.append(f"repaired: {s.get('commit_records_dropped', 0)} commit record(s) with missing files redone, "
                     f"{s.get('orphan_files_removed', 0)} orphan file(s) of a crashed run removed")
    lines.append(f"{s['seconds']} s, {s['rows_per_second']} rows/s, "
                 f"{s['output_tokens_per_second']} output tokens/s, model {s['model']}")
    lines.append(f"output: {s['output_path']}")
    if s.get("failed"):
        lines.append(f"FAILED: {s['failed']}")
    return "\n".join(lines)
