"""Items stage (Ray tasks, fused with the read): each row's concepts and tags, what is known of
its subject, the reference images its requests show, and its QA items.

A plain function over batches: no state worth an actor. Every decision comes from
`personalization/` (concepts, subjects, items); this stage only lays them out as columns. A row
whose concept cannot get a tag becomes `bad_concept`, one whose subject-type column holds
something else `bad_record`; an error row asks nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from persqa_ray import schema
from persqa_ray.io.readers import concept_names
from persqa_ray.personalization.items import ITEM_TYPE, references, row_items
from persqa_ray.personalization.options import PersonalizationOptions
from persqa_ray.personalization.subjects import Subject, resolve_subject
from persqa_ray.stages.base import Stage

if TYPE_CHECKING:
    from persqa_ray.pipeline.plan import Plan

ADDS = ("concept", "tag", "image_concepts", "subject_type", "subject_type_source", schema.CLASS_PHRASE,
        schema.ITEMS, schema.DETECT, schema.REF_IMAGES, schema.REF_CAPTIONS, "language")
_TYPES = {schema.ITEMS: pa.list_(ITEM_TYPE), schema.DETECT: pa.bool_(), "image_concepts": pa.list_(pa.string()),
          schema.REF_IMAGES: pa.list_(pa.string()), schema.REF_CAPTIONS: pa.list_(pa.string())}


def _row(opts: PersonalizationOptions, row_id: str, value, subject_value, ok: bool, text_row: bool) -> dict:
    """One row's columns, and the error that makes it an error row (None: it stays ok)."""
    concepts, why = opts.registry.resolve_all(value)
    multi = len(concepts) > 1
    subject = Subject(None, "unknown") if multi or not concepts else resolve_subject(opts, subject_value, concepts[0])
    status, error = None, None
    if ok and why:
        status, error = schema.BAD_CONCEPT, why
    elif ok and subject.error:
        status, error = schema.BAD_RECORD, subject.error
    elif ok and multi and opts.templates().multi is None:
        status, error = schema.BAD_CONCEPT, "a multi-concept row, but the template file has no multi family"
    ok = ok and status is None
    refs, captions = references(opts, concepts) if ok and not text_row else ([], [])
    raw = None if value is None else (", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
    return {"status": status, "error": error,
            "concept": "+".join(c.name for c in concepts) if concepts else raw,
            "tag": " ".join(c.tag for c in concepts) if concepts else None,
            "image_concepts": [c.name for c in concepts],
            "subject_type": subject.type, "subject_type_source": subject.source,
            schema.CLASS_PHRASE: concepts[0].class_phrase if len(concepts) == 1 else None,
            schema.ITEMS: row_items(opts, row_id, concepts, subject, text_row) if ok else [],
            schema.DETECT: ok and subject.pending and not text_row,
            schema.REF_IMAGES: refs, schema.REF_CAPTIONS: captions}


def build_items(batch: pa.Table, opts: PersonalizationOptions) -> pa.Table:
    n = batch.num_rows
    names = set(batch.column_names)
    col = (lambda c: batch.column(c).to_pylist() if c and c in names else [None] * n)
    # The reader parses input.concept_column into names (a list for a multi-concept image); a table
    # made otherwise has only the column itself.
    concept_values = col(schema.CONCEPTS) if opts.concept_column and schema.CONCEPTS in names else \
        [concept_names(v) for v in col(opts.concept_column)]
    subject_values, text_rows = col(opts.subject_type_column), col(schema.TEXT_ROW)
    status, error = batch.column("status").to_pylist(), batch.column("error").to_pylist()
    out: dict[str, list] = {k: [] for k in ADDS[:-1]}
    for i, row_id in enumerate(batch.column("row_id").to_pylist()):
        text_row = text_rows[i]  # a concept row (io/concept_rows.py) names its concept here
        r = _row(opts, row_id, text_row or concept_values[i], subject_values[i], status[i] == schema.OK,
                 bool(text_row))
        if r["status"]:
            status[i], error[i] = r["status"], r["error"]
        for k in out:
            out[k].append(r[k])
    batch = batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    batch = batch.set_column(batch.schema.get_field_index("error"), "error", pa.array(error, pa.string()))
    for name, values in out.items():
        batch = batch.append_column(name, pa.array(values, _TYPES.get(name, pa.string())))
    return batch.append_column("language", pa.array([opts.language] * n, pa.string()))


def items_stage(p: "Plan") -> Stage:
    # Batches of input.block_rows, not whole blocks: the Python objects of one batch at a time.
    return Stage("items", build_items, {"opts": p.personalization}, needs=("row_id", "status", "error"), adds=ADDS,
                 batch_size=p.config.input.block_rows)
