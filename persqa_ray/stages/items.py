"""Items stage (Ray tasks, fused with the read): each row's concept and tag, what is known of its
subject, and its QA items.

A plain function over batches: no state worth an actor. Every decision comes from
`personalization/` (concepts, subjects, items); this stage only lays them out as columns. A row
whose concept cannot get a tag becomes `bad_concept`, one whose subject-type column holds
something else `bad_record`; an error row asks nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from persqa_ray import schema
from persqa_ray.personalization.items import ITEM_TYPE, row_items
from persqa_ray.personalization.options import PersonalizationOptions
from persqa_ray.personalization.subjects import resolve_subject
from persqa_ray.stages.base import Stage

if TYPE_CHECKING:
    from persqa_ray.pipeline.plan import Plan

ADDS = ("concept", "tag", "subject_type", "subject_type_source", schema.CLASS_PHRASE, schema.ITEMS, schema.DETECT,
        "language")


def build_items(batch: pa.Table, opts: PersonalizationOptions) -> pa.Table:
    n = batch.num_rows
    names = set(batch.column_names)
    col = (lambda c: batch.column(c).to_pylist() if c and c in names else [None] * n)
    concept_values, subject_values = col(opts.concept_column), col(opts.subject_type_column)
    status, error = batch.column("status").to_pylist(), batch.column("error").to_pylist()
    out: dict[str, list] = {k: [] for k in ADDS[:-1]}
    for i, row_id in enumerate(batch.column("row_id").to_pylist()):
        concept, why = opts.registry.resolve(concept_values[i])
        subject = resolve_subject(opts, subject_values[i], concept)
        if status[i] == schema.OK and why:
            status[i], error[i] = schema.BAD_CONCEPT, why
        elif status[i] == schema.OK and subject.error:
            status[i], error[i] = schema.BAD_RECORD, subject.error
        ok = status[i] == schema.OK
        out["concept"].append(concept.name if concept else
                              (None if concept_values[i] is None else str(concept_values[i])))
        out["tag"].append(concept.tag if concept else None)
        out["subject_type"].append(subject.type)
        out["subject_type_source"].append(subject.source)
        out[schema.CLASS_PHRASE].append(concept.class_phrase if concept else None)
        out[schema.ITEMS].append(row_items(opts, row_id, concept, subject) if ok else [])
        out[schema.DETECT].append(ok and subject.pending)
    batch = batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    batch = batch.set_column(batch.schema.get_field_index("error"), "error", pa.array(error, pa.string()))
    types = {schema.ITEMS: pa.list_(ITEM_TYPE), schema.DETECT: pa.bool_()}
    for name, values in out.items():
        batch = batch.append_column(name, pa.array(values, types.get(name, pa.string())))
    return batch.append_column("language", pa.array([opts.language] * n, pa.string()))


def items_stage(p: "Plan") -> Stage:
    return Stage("items", build_items, {"opts": p.personalization}, needs=("row_id", "status", "error"), adds=ADDS)
