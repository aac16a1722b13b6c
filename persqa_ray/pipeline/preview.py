"""`--dry-run`: the first rows' items, built on the driver with no Ray and no engine."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from persqa_ray import schema
from persqa_ray.io.readers import read_shard
from persqa_ray.stages.items import build_items

if TYPE_CHECKING:
    from persqa_ray.pipeline.plan import Plan

_SHOWN = ("qa_type", "template_id", "question", "prompt", "answer")


def preview(p: "Plan", n: int = 3) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for shard in p.shards:
        for table in read_shard(shard.path, shard.format, p.read):
            for r in build_items(table.slice(0, n - len(out)), p.personalization).to_pylist():
                items = r[schema.ITEMS]
                out.append({
                    "row_id": r["row_id"], "image": r["image"], "status": r["status"], "error": r["error"],
                    "concept": r["concept"], "tag": r["tag"], "subject_type": r["subject_type"],
                    "subject_type_source": "detected (by the VLM, at run time)" if r[schema.DETECT]
                    else r["subject_type_source"],
                    "items": [{k: it[k] for k in _SHOWN if it[k] is not None} for it in items],
                    "system_prompt": items[0]["system"] if items else None})
            if len(out) >= n:
                return out
    return out
