"""`input.concepts_table`: a concept registry kept as data (Parquet or JSONL), for thousands of
concepts: one row per concept with `concept` (its name) and optionally `tag`, `class_phrase`,
`subject_type`, `reference_images` (a path or a list; relative paths resolve against the
table's directory) and `info`. Read once on the driver (O(concepts), never O(rows))."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import pyarrow.parquet as pq

from persqa_ray.io.filesystems import filesystem, is_url, join, parent_of
from persqa_ray.personalization.concepts import Concept, valid_tag_name
from persqa_ray.personalization.templates import SUBJECT_TYPES


class ConceptTableError(ValueError):
    pass


def _rows(path: str, storage_options: Optional[dict]) -> list[dict]:
    fs, p = filesystem(path, storage_options)
    if not fs.exists(p):
        raise ConceptTableError(f"{path} does not exist")
    with fs.open(p, "rb") as f:
        if path.lower().endswith(".parquet"):
            return pq.read_table(f).to_pylist()
        rows = []
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConceptTableError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        return rows


def resolve_ref(ref: str, base: str) -> str:
    """A reference image as the decoder reads it: URLs as they are, local paths absolute."""
    if is_url(ref):
        return ref
    ref = os.path.expanduser(ref)
    return ref if os.path.isabs(ref) else os.path.abspath(join(base, ref))


def _concept(row: dict, base: str, where: str) -> Concept:
    name = str(row.get("concept") or "").strip()
    if not name:
        raise ConceptTableError(f"{where}: no 'concept' name")
    tag = str(row.get("tag") or name).strip().strip("<>")
    if not valid_tag_name(tag):
        raise ConceptTableError(f"{where}: concept {name!r} needs a tag of letters, digits, '_' or '-'")
    st = row.get("subject_type") or None
    if st is not None and st not in SUBJECT_TYPES:
        raise ConceptTableError(f"{where}: subject_type {st!r} is not one of {', '.join(SUBJECT_TYPES)}")
    refs: Any = row.get("reference_images") or []
    refs = [refs] if isinstance(refs, str) else list(refs)
    return Concept(name, f"<{tag}>", row.get("class_phrase") or None, st,
                   tuple(resolve_ref(str(r), base) for r in refs if r), row.get("info") or None)


def load_concepts_table(path: str, storage_options: Optional[dict] = None) -> list[Concept]:
    path = path if is_url(path) else os.path.abspath(os.path.expanduser(path))
    base = parent_of(path)
    concepts, tags = [], {}
    for i, row in enumerate(_rows(path, storage_options), start=1):
        c = _concept(row, base, f"{path} row {i}")
        if c.tag in tags and tags[c.tag] != c.name:
            raise ConceptTableError(f"{path} row {i}: tag {c.tag} is already the tag of concept {tags[c.tag]!r}")
        tags[c.tag] = c.name
        concepts.append(c)
    return concepts
