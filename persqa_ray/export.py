"""`persqa-ray export`: training files from an output dataset (its `ok` QA rows only).

Formats:
- llava: a JSON list of {id, image, conversations: [{from: human|gpt, value}]}, one conversation
  per input row with all its QA pairs as turns; the first human turn carries one "<image>\\n" per
  image: the reference images first, each followed by its caption ("This is <chelsea>."), then the
  query image(s). A text-only conversation (qa_type text) has no image and no "<image>".
- sharegpt: a JSON list of {id, messages: [{role: user|assistant, content}], images} (the
  multimodal ShareGPT layout LLaMA-Factory reads), images in the same order.
- jsonl: one QA pair per line with its concept, type, label and template.
- rap: the LLaVA conversations, and beside them RAP's concept database (database.json:
  concept_dict keyed by tag with name, image, info, category; path_to_concept for every reference
  image), from the run's registry (_concepts.json) and its text-only answers.
A split (`concept:0.8`) puts whole concepts on one side: no concept's images or tag appear in both
files. A multi-concept row whose concepts fall on both sides is dropped (and counted), and so is a
"No" recognition pair that asks about a concept of the other side.
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
from persqa_ray.io.outputs import read_concepts

FORMATS = ("llava", "sharegpt", "jsonl", "rap")
_JSONL_FIELDS = ("row_id", "qa_index", "image", "qa_type", "concept", "tag", "image_concept", "image_concepts",
                 "reference_images", "subject_type", "label", "negative_kind", "question", "answer", "pers_qa",
                 "template_id", "language")


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


def _relative(refs: list[str], image_root: Optional[str]) -> list[str]:
    if not image_root:
        return list(refs)
    root = os.path.abspath(image_root)
    return [os.path.relpath(r, root) if not is_url(r) and os.path.abspath(r).startswith(root + os.sep) else r
            for r in refs]


class Images:
    """A conversation's images and the text that introduces them: reference images (each with its
    caption, in the row's language, naming the concept it shows) then the query images; none for a
    text-only row."""

    def __init__(self, concepts: list[dict], image_root: Optional[str]):
        self.tag_of = {ref: c["tag"] for c in concepts for ref in c.get("reference_images") or []}
        self.image_root = image_root

    def of(self, row: dict) -> tuple[list[str], list[str]]:
        """(paths, captions): one caption per reference image ('' for a query image)."""
        if row.get("qa_type") == "text":
            return [], []
        from persqa_ray.personalization.templates import load_templates
        refs, query = list(row.get("reference_images") or []), list(row.get("image") or [])
        caption = load_templates(row.get("language") or "en").reference_caption if refs else ""
        captions = [caption.replace("{tag}", self.tag_of.get(r, row["tag"].split()[0])) for r in refs]
        return _relative(refs + query, self.image_root), captions + [""] * len(query)


def _conversations(rows: list[dict]) -> dict[str, list[dict]]:
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["row_id"], []).append(r)
    return by_image


def _dialogue(qas: list[dict], captions: list[str], image_token: str) -> list[tuple[str, str]]:
    """(question, answer) turns of one conversation; the first question carries the image tokens
    (each reference image followed by its caption)."""
    intro = "".join(image_token + (f"{c}\n" if c else "") for c in captions)
    return [((intro if i == 0 else "") + qa["question"], qa["answer"]) for i, qa in enumerate(qas)]


def to_llava(rows: list[dict], images: Images) -> list[dict]:
    out = []
    for row_id, qas in _conversations(rows).items():
        paths, captions = images.of(qas[0])
        turns = [t for q, a in _dialogue(qas, captions, "<image>\n")
                 for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        record = {"id": row_id, "conversations": turns}
        if paths:
            record["image"] = paths[0] if len(paths) == 1 else paths
        out.append(record)
    return out


def to_sharegpt(rows: list[dict], images: Images) -> list[dict]:
    out = []
    for row_id, qas in _conversations(rows).items():
        paths, captions = images.of(qas[0])
        messages = [m for q, a in _dialogue(qas, captions, "<image>")
                    for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        out.append({"id": row_id, "messages": messages, "images": paths})
    return out


def to_jsonl(rows: list[dict], images: Images) -> list[dict]:
    return [{**{k: r.get(k) for k in _JSONL_FIELDS}, "image": _relative(r.get("image") or [], images.image_root),
             "reference_images": _relative(r.get("reference_images") or [], images.image_root)} for r in rows]


def concept_sides(concepts: set, train_fraction: float, seed: int = 0) -> dict[str, str]:
    concepts = sorted(concepts)
    if len(concepts) < 2:
        raise ExportError(f"a concept split needs at least 2 concepts; the output has {len(concepts)}")
    random.Random(f"persqa-split:{seed}").shuffle(concepts)
    n_train = min(len(concepts) - 1, max(1, round(train_fraction * len(concepts))))
    return {c: ("train" if i < n_train else "test") for i, c in enumerate(concepts)}


def image_concepts(row: dict) -> list[str]:
    return list(row.get("image_concepts") or ([row["image_concept"]] if row.get("image_concept") else []))


def _assign(rows: list[dict], side: dict[str, str]) -> tuple[dict[str, list[dict]], int]:
    """Rows by side. A multi-concept row with concepts on both sides, and a "No" pair about a
    concept on the other side, would leak a tag across the split: dropped."""
    parts: dict[str, list[dict]] = {"train": [], "test": []}
    dropped = 0
    for r in rows:
        sides = {side[c] for c in image_concepts(r)}
        negative = r.get("negative_concept") or (r["concept"] if r.get("qa_type") == "recognition" else None)
        asked = [side.get(negative)] if negative else []
        if len(sides) != 1 or any(a not in sides for a in asked if a is not None):
            dropped += 1
            continue
        parts[sides.pop()].append(r)
    return parts, dropped


def split_by_concept(rows: list[dict], train_fraction: float, seed: int = 0) -> tuple[dict[str, list[dict]], dict]:
    side = concept_sides({c for r in rows for c in image_concepts(r)}, train_fraction, seed)
    parts, dropped = _assign(rows, side)
    info = {"train_concepts": sorted(c for c, s in side.items() if s == "train"),
            "test_concepts": sorted(c for c, s in side.items() if s == "test"),
            "cross_split_pairs_dropped": dropped}
    return parts, info


def _split_path(path: str, part: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.{part}{ext}"


# Characters that JSON leaves raw inside strings but that many line readers take for line breaks
# (Python's str.splitlines, JavaScript before ES2019): a model's answer held U+0085 and a JSONL
# line read back as two. Escaped, the line is still the same JSON value.
_LINE_BREAKS_JSON_KEEPS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def jsonl_line(obj) -> str:
    """One JSONL line (UTF-8 text kept readable), safe for any line splitter."""
    line = json.dumps(obj, ensure_ascii=False)
    for raw, escaped in _LINE_BREAKS_JSON_KEEPS.items():
        line = line.replace(raw, escaped)
    return line + "\n"


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
                self.f.write(jsonl_line(r))
            else:
                self.f.write(("," if self.n else "") + "\n" + json.dumps(r, ensure_ascii=False, indent=1))
            self.n += 1

    def close(self) -> int:
        if self.fmt != "jsonl":
            self.f.write("\n]\n")
        self.f.close()
        return self.n


class RapDatabase:
    """RAP's concept database (its example_database/database.json layout), filled while the
    conversations stream past: O(concepts). A concept's image is its first reference image, else
    the first query image of a row that shows it alone; its info is the run's own description, else
    its first text-only answer; its category its class phrase, else its subject type (configured,
    or the majority of its rows' subject-type column)."""

    def __init__(self, concepts: list[dict], image_root: Optional[str]):
        self.concepts = {c["name"]: dict(c) for c in concepts}
        self.image_root = image_root

    def see(self, rows: list[dict]) -> None:
        for r in rows:
            names = image_concepts(r)
            if len(names) != 1 or r.get("concept") != names[0]:
                continue  # a row about its own, single concept (not a 'No' pair, not a multi-concept photo)
            c = self.concepts.setdefault(names[0], {"name": names[0], "tag": r["tag"]})
            if r.get("qa_type") == "text" and not c.get("info"):
                c["info"] = r["answer"]
            if r.get("qa_type") != "text" and not c.get("reference_images") and r.get("image"):
                c["reference_images"] = [r["image"][0]]

    def write(self, path: str, storage_options: Optional[dict]) -> int:
        concept_dict, path_to_concept = {}, {}
        for name, c in sorted(self.concepts.items()):
            refs = _relative(c.get("reference_images") or [], self.image_root)
            if not refs:
                continue  # RAP retrieves by image: a concept with none cannot be in its database
            phrase = (c.get("class_phrase") or "").removeprefix("the ").strip()
            concept_dict[c["tag"]] = {"name": name, "image": refs[0], "info": c.get("info") or "",
                                      "category": phrase or c.get("subject_type") or ""}
            path_to_concept.update({ref: c["tag"] for ref in refs})
        fs, p = filesystem(path if is_url(path) else os.path.abspath(path), storage_options)
        with fs.open(p, "w", encoding="utf-8") as f:
            json.dump({"concept_dict": concept_dict, "path_to_concept": path_to_concept}, f, ensure_ascii=False,
                      indent=1)
        return len(concept_dict)


def _database_path(out: str) -> str:
    return (out.rsplit("/", 1)[0] if "/" in out else ".") + "/database.json" if is_url(out) else \
        os.path.join(os.path.dirname(os.path.abspath(out)), "database.json")


def export(output: str, fmt: str, out: str, split: Optional[str] = None, seed: int = 0,
           storage_options: Optional[dict] = None, image_root: Optional[str] = None) -> dict[str, Any]:
    """Write the export, streaming over the output; returns {file: record count} plus split details."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    fraction = parse_split(split)
    build = {"llava": to_llava, "sharegpt": to_sharegpt, "jsonl": to_jsonl, "rap": to_llava}[fmt]
    registry = read_concepts(output, storage_options)
    images = Images(registry, image_root)
    database = RapDatabase(registry, image_root) if fmt == "rap" else None
    side = None
    if fraction is not None:  # first pass: the concepts (a small set), so the sides are known
        side = concept_sides({c for block in _ok_blocks(output, storage_options) for r in block
                              for c in image_concepts(r)}, fraction, seed)
    paths = {"all": out} if side is None else {part: _split_path(out, part) for part in ("train", "test")}
    writers = {part: _Writer("llava" if fmt == "rap" else fmt, path, storage_options) for part, path in paths.items()}
    qa_rows = dropped = 0
    try:
        for block in _ok_blocks(output, storage_options):
            qa_rows += len(block)
            if database is not None:
                database.see(block)
            parts, n = ({"all": block}, 0) if side is None else _assign(block, side)
            dropped += n
            for part, rows in parts.items():
                writers[part].write(build(rows, images))
    finally:
        counts = {paths[part]: w.close() for part, w in writers.items()}
    if not qa_rows:
        raise ExportError(f"{output}: no output rows found")
    result: dict[str, Any] = {"qa_rows": qa_rows, "files": counts}
    if database is not None:
        result["database"] = _database_path(out)
        counts[result["database"]] = database.write(result["database"], storage_options)
    if side is not None:
        result.update(train_concepts=sorted(c for c, s in side.items() if s == "train"),
                      test_concepts=sorted(c for c, s in side.items() if s == "test"),
                      cross_split_pairs_dropped=dropped)
    return result
