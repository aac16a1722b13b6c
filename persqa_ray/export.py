"""`persqa-ray export`: training files from an output dataset (its `ok` QA rows only).

Formats:
- llava: a JSON list of {id, image, conversations: [{from: human|gpt, value}]}, one conversation
  per image with all its QA pairs as turns; the first human turn starts with "<image>\\n".
- sharegpt: a JSON list of {id, messages: [{role: user|assistant, content}], images} (the
  multimodal ShareGPT layout LLaMA-Factory reads; one "<image>" per image in the first turn).
- jsonl: one QA pair per line with its concept, type, label and template.
A split (`concept:0.8`) puts whole concepts on one side: no concept's images or tag appear in both
files. A "No" recognition pair joins its image's side only when the concept it asks about is on
the same side; otherwise it is dropped (and counted).
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Optional

import pyarrow.compute as pc

from persqa_ray import schema
from persqa_ray.io.dataset import iter_output
from persqa_ray.io.filesystems import filesystem, is_url

FORMATS = ("llava", "sharegpt", "jsonl")
_JSONL_FIELDS = ("row_id", "qa_index", "image", "qa_type", "concept", "tag", "image_concept", "subject_type",
                 "label", "question", "answer", "pers_qa", "template_id", "language")


class ExportError(ValueError):
    pass


def parse_split(spec: Optional[str]) -> Optional[float]:
    if not spec:
        return None
    kind, _, frac = spec.partition(":")
    try:
        value = float(frac)
    except ValueError:
        value = -1.0
    if kind != "concept" or not 0 < value < 1:
        raise ExportError(f"--split {spec!r}: expected concept:FRACTION with 0 < FRACTION < 1, e.g. concept:0.8")
    return value


def _ok_blocks(output: str, storage_options: Optional[dict]):
    """The output's ok rows, one commit record at a time, sorted within it (a row's QA rows are
    always committed together, so conversations never span blocks)."""
    for t in iter_output(output, None, storage_options):
        if "status" not in t.column_names or not t.num_rows:
            continue
        t = t.filter(pc.equal(t.column("status"), schema.OK))
        if t.num_rows:
            yield t.sort_by([("row_id", "ascending"), ("qa_index", "ascending")]).to_pylist()


def ok_rows(output: str, storage_options: Optional[dict] = None) -> list[dict]:
    rows = [r for block in _ok_blocks(output, storage_options) for r in block]
    if not rows:
        raise ExportError(f"{output}: no output rows found")
    return rows


def _image_refs(row: dict, image_root: Optional[str]) -> list[str]:
    refs = list(row.get("image") or [])
    if image_root:
        root = os.path.abspath(image_root)
        refs = [os.path.relpath(r, root) if not is_url(r) and os.path.abspath(r).startswith(root + os.sep) else r
                for r in refs]
    return refs


def _conversations(rows: list[dict]) -> dict[str, list[dict]]:
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["row_id"], []).append(r)
    return by_image


def _dialogue(qas: list[dict], n_images: int, image_token: str) -> list[tuple[str, str]]:
    """(question, answer) turns of one image; the first question carries the image tokens."""
    return [((image_token * n_images if i == 0 else "") + qa["question"], qa["answer"]) for i, qa in enumerate(qas)]


def to_llava(rows: list[dict], image_root: Optional[str] = None) -> list[dict]:
    out = []
    for row_id, qas in _conversations(rows).items():
        images = _image_refs(qas[0], image_root)
        turns = [t for q, a in _dialogue(qas, len(images), "<image>\n")
                 for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        out.append({"id": row_id, "image": images[0] if len(images) == 1 else images, "conversations": turns})
    return out


def to_sharegpt(rows: list[dict], image_root: Optional[str] = None) -> list[dict]:
    out = []
    for row_id, qas in _conversations(rows).items():
        images = _image_refs(qas[0], image_root)
        messages = [m for q, a in _dialogue(qas, len(images), "<image>")
                    for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        out.append({"id": row_id, "messages": messages, "images": images})
    return out


def to_jsonl(rows: list[dict], image_root: Optional[str] = None) -> list[dict]:
    return [{**{k: r.get(k) for k in _JSONL_FIELDS}, "image": _image_refs(r, image_root)} for r in rows]


def concept_sides(concepts: set, train_fraction: float, seed: int = 0) -> dict[str, str]:
    concepts = sorted(concepts)
    if len(concepts) < 2:
        raise ExportError(f"a concept split needs at least 2 concepts; the output has {len(concepts)}")
    random.Random(f"persqa-split:{seed}").shuffle(concepts)
    n_train = min(len(concepts) - 1, max(1, round(train_fraction * len(concepts))))
    return {c: ("train" if i < n_train else "test") for i, c in enumerate(concepts)}


def _assign(rows: list[dict], side: dict[str, str]) -> tuple[dict[str, list[dict]], int]:
    """Rows by side; a "No" pair about a concept on the other side would leak its tag: dropped."""
    parts: dict[str, list[dict]] = {"train": [], "test": []}
    dropped = 0
    for r in rows:
        s = side[r["image_concept"]]
        if side.get(r["concept"], s) != s:
            dropped += 1
            continue
        parts[s].append(r)
    return parts, dropped


def split_by_concept(rows: list[dict], train_fraction: float, seed: int = 0) -> tuple[dict[str, list[dict]], dict]:
    side = concept_sides({r["image_concept"] for r in rows if r.get("image_concept") is not None},
                         train_fraction, seed)
    parts, dropped = _assign(rows, side)
    info = {"train_concepts": sorted(c for c, s in side.items() if s == "train"),
            "test_concepts": sorted(c for c, s in side.items() if s == "test"),
            "cross_split_pairs_dropped": dropped}
    return parts, info


def _split_path(path: str, part: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.{part}{ext}"


class _Writer:
    """Writes records as they come: JSONL lines, or one JSON list written item by item."""

    def __init__(self, fmt: str, path: str, storage_options: Optional[dict]):
        fs, p = filesystem(path if is_url(path) else os.path.abspath(path), storage_options)
        parent = p.rsplit("/", 1)[0]
        if parent and not is_url(path):
            fs.makedirs(parent, exist_ok=True)
        self.fmt, self.n = fmt, 0
        self.f = fs.open(p, "w", encoding="utf-8")
        if fmt != "jsonl":
            self.f.write("[")

    def write(self, records: list[dict]) -> None:
        for r in records:
            if self.fmt == "jsonl":
                self.f.write(json.dumps(r, ensure_ascii=False) + "\n")
            else:
                self.f.write(("," if self.n else "") + "\n" + json.dumps(r, ensure_ascii=False, indent=1))
            self.n += 1

    def close(self) -> int:
        if self.fmt != "jsonl":
            self.f.write("\n]\n")
        self.f.close()
        return self.n


def export(output: str, fmt: str, out: str, split: Optional[str] = None, seed: int = 0,
           storage_options: Optional[dict] = None, image_root: Optional[str] = None) -> dict[str, Any]:
    """Write the export, streaming over the output; returns {file: record count} plus split details."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    fraction = parse_split(split)
    build = {"llava": to_llava, "sharegpt": to_sharegpt, "jsonl": to_jsonl}[fmt]
    side = None
    if fraction is not None:  # first pass: the concepts (a small set), so the sides are known
        concepts = {r["image_concept"] for block in _ok_blocks(output, storage_options) for r in block
                    if r.get("image_concept") is not None}
        side = concept_sides(concepts, fraction, seed)
    paths = {"all": out} if side is None else {part: _split_path(out, part) for part in ("train", "test")}
    writers = {part: _Writer(fmt, path, storage_options) for part, path in paths.items()}
    qa_rows = dropped = 0
    try:
        for block in _ok_blocks(output, storage_options):
            qa_rows += len(block)
            if side is None:
                writers["all"].write(build(block, image_root))
                continue
            parts, n = _assign(block, side)
            dropped += n
            for part, rows in parts.items():
                writers[part].write(build(rows, image_root))
    finally:
        counts = {paths[part]: w.close() for part, w in writers.items()}
    if not qa_rows:
        raise ExportError(f"{output}: no output rows found")
    result: dict[str, Any] = {"qa_rows": qa_rows, "files": counts}
    if side is not None:
        result.update(train_concepts=sorted(c for c, s in side.items() if s == "train"),
                      test_concepts=sorted(c for c, s in side.items() if s == "test"),
                      cross_split_pairs_dropped=dropped)
    return result
