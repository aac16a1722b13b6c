"""Concept rows: the input of text-only concept QA (prompt.text_qa_per_concept).

One row per concept that has reference images, read from a shard of its own
(`persqa-concepts://text-qa`, format `concepts`) so they go through the same stages, commits and
resume as input rows: its images are the concept's reference images, and its `_pq_text_row`
column names the concept. A row's position in that shard is a digest of the concept's name, so a
concept keeps its position (and its done state) when others are added to the registry.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

from persqa_ray import schema
from persqa_ray.io.filesystems import Shard
from persqa_ray.io.row_ids import positional_row_id

CONCEPTS_SHARD = "persqa-concepts://text-qa"
CONCEPTS_FORMAT = "concepts"


def concept_shard() -> Shard:
    return Shard(CONCEPTS_SHARD, CONCEPTS_FORMAT, 0)


def position_of(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=6).digest(), "big")


def concept_records(concepts, skip) -> Iterator[dict]:
    """Normalized rows (as io/readers.normalize_row makes them) of (name, reference images) pairs;
    None for a row an earlier run committed."""
    for name, refs in sorted(concepts):
        position = position_of(name)
        if skip(position):
            yield None
            continue
        yield {"row_id": positional_row_id(CONCEPTS_SHARD, position), "image": list(refs), "status": schema.OK,
               "error": None, schema.SOURCE: CONCEPTS_SHARD, schema.POSITION: position, schema.REPLACES: None,
               schema.TEXT_ROW: name}
