"""Build requests: each row's concept and tag, subject type, and its QA items.

A plain function over batches (Ray tasks, fused with the read): no state worth an actor.
An item is one future QA row: an open question for the VLM (drawn from the subject type's
families, reproducible from (seed, row_id)) or a recognition pair whose answer is built from its
label. Rows whose subject type must be detected by the VLM get their open items in the generate
stage, from the same `open_items` function, once the type is known.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa

from persqa_ray import schema
from persqa_ray.personalization.concepts import Concept, ConceptRegistry
from persqa_ray.personalization.templates import SUBJECT_TYPES, TemplateSet, draw_questions, load_templates, row_rng

OPEN, RECOGNITION = "open", "recognition"
ITEM_TYPE = pa.struct([(name, pa.string()) for name in (
    "qa_type", "concept", "tag", "question", "template_id", "system", "prompt", "prefix", "phrase",
    "answer", "label", "check")])


@dataclass(frozen=True)
class RequestOptions:
    tag_name: str
    seed: int
    questions_per_image: int
    language: str
    templates_path: Optional[str] = None
    system_prompt: Optional[str] = None
    concepts: Optional[ConceptRegistry] = None  # unset: every row is the concept `tag_name`
    concept_column: Optional[str] = None        # the normalized row's column name
    subject_type_column: Optional[str] = None
    detect_subject_type: bool = False
    default_subject_type: Optional[str] = None
    recognition: bool = False
    recognition_check: bool = False
    substitute: bool = False
    _registry: dict = field(init=False, default_factory=dict, compare=False, repr=False)

    @property
    def tag(self) -> str:
        return f"<{self.tag_name}>"

    @property
    def registry(self) -> ConceptRegistry:
        if self.concepts is not None:
            return self.concepts
        if "default" not in self._registry:  # built once, not per row
            self._registry["default"] = ConceptRegistry(default=self.tag_name)
        return self._registry["default"]

    def templates(self) -> TemplateSet:
        return load_templates(self.language, self.templates_path)

    def system_prompt_for(self, tag: str) -> str:
        return (self.system_prompt or self.templates().system_prompt).replace("{tag}", tag)

    def render_system_prompt(self) -> str:
        return self.system_prompt_for(self.tag)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def class_phrase(opts: RequestOptions, concept: Concept, subject_type: Optional[str]) -> str:
    return concept.class_phrase or opts.templates().class_phrases[subject_type or "unknown"]


def _item(**kw) -> dict[str, Any]:
    return {name: kw.get(name) for name in ITEM_TYPE.names}


def open_items(opts: RequestOptions, row_id: str, concept: Concept, subject_type: Optional[str]) -> list[dict]:
    """The row's k open questions, drawn from its subject type's families (the single draw)."""
    ts = opts.templates()
    items = []
    for t in draw_questions(ts, opts.seed, row_id, opts.questions_per_image, subject_type):
        question = t.render(concept.tag)
        if opts.substitute:  # MyVLM: ask about "the cat", put the tag in afterwards
            phrase = class_phrase(opts, concept, subject_type)
            asked = t.render(phrase)
            asked = _capitalize(asked) if t.text.startswith("{tag}") else asked
            items.append(_item(
                qa_type=OPEN, concept=concept.name, tag=concept.tag, question=question, template_id=t.id,
                system=ts.substitution_system_prompt.replace("{class_phrase}", phrase),
                prompt=ts.substitution_user_prompt.replace("{question}", asked).replace("{class_phrase}", phrase),
                prefix=_capitalize(phrase), phrase=phrase))
        else:
            items.append(_item(
                qa_type=OPEN, concept=concept.name, tag=concept.tag, question=question, template_id=t.id,
                system=opts.system_prompt_for(concept.tag),
                prompt=ts.user_prompt.replace("{question}", question).replace("{tag}", concept.tag),
                prefix=concept.tag, phrase=concept.class_phrase))
    return items


def recognition_items(opts: RequestOptions, row_id: str, concept: Concept) -> list[dict]:
    """'Is <tag> in this photo?' with the row's own concept (yes) and, when the dataset has other
    concepts, with one of theirs (no): one of each per image, so labels are balanced 50/50."""
    ts = opts.templates()
    rec = ts.recognition
    rng = row_rng(opts.seed, row_id, ":recognition")
    pairs = [(concept, "yes")]
    others = opts.registry.negatives_for(concept)
    if others:
        pairs.append((rng.choice(others), "no"))
    items = []
    for asked, label in pairs:
        t = rng.choice(rec.templates)
        check = None
        if opts.recognition_check:
            check = rec.check_prompt.replace("{question}", t.render(asked.class_phrase or asked.tag))
        items.append(_item(qa_type=RECOGNITION, concept=asked.name, tag=asked.tag, question=t.render(asked.tag),
                           template_id=t.id, answer=rec.answer(label, asked.tag), label=label, check=check,
                           system=opts.system_prompt_for(asked.tag)))
    return items


def plan_questions(opts: RequestOptions, row_id: str, subject_type: Optional[str] = None):
    """(questions, template ids, user messages) of the default concept: for tools and benchmarks."""
    items = open_items(opts, row_id, opts.registry.resolve(None)[0], subject_type)
    return [i["question"] for i in items], [i["template_id"] for i in items], [i["prompt"] for i in items]


def _subject(opts: RequestOptions, value: Any, concept: Optional[Concept]):
    """(subject_type, source, error) for one row."""
    if value is not None and str(value).strip():
        st = str(value).strip().lower()
        if st in SUBJECT_TYPES:
            return st, "column", None
        return None, None, (f"{opts.subject_type_column} value {value!r} is not a subject type "
                            f"({', '.join(SUBJECT_TYPES)})")
    if concept is not None and concept.subject_type:
        return concept.subject_type, "concept", None
    if opts.detect_subject_type:
        return None, "detect", None  # decided by the VLM in the generate stage
    if opts.default_subject_type:
        return opts.default_subject_type, "default", None
    return None, "unknown", None


def build_requests(batch: pa.Table, opts: RequestOptions) -> pa.Table:
    n = batch.num_rows
    names = set(batch.column_names)
    col = (lambda c: batch.column(c).to_pylist() if c and c in names else [None] * n)
    concept_values, subject_values = col(opts.concept_column), col(opts.subject_type_column)
    status, error = batch.column("status").to_pylist(), batch.column("error").to_pylist()
    out: dict[str, list] = {k: [] for k in ("concept", "tag", "subject_type", "subject_type_source",
                                            schema.CLASS_PHRASE, schema.ITEMS)}
    for i, row_id in enumerate(batch.column("row_id").to_pylist()):
        concept, why = opts.registry.resolve(concept_values[i])
        st, source, bad = _subject(opts, subject_values[i], concept)
        if status[i] == schema.OK and why:
            status[i], error[i] = schema.BAD_CONCEPT, why
        elif status[i] == schema.OK and bad:
            status[i], error[i] = schema.BAD_RECORD, bad
        items = []
        if status[i] == schema.OK:
            items = [] if source == "detect" else open_items(opts, row_id, concept, st)
            items += recognition_items(opts, row_id, concept) if opts.recognition else []
        out["concept"].append(concept.name if concept else
                              (None if concept_values[i] is None else str(concept_values[i])))
        out["tag"].append(concept.tag if concept else None)
        out["subject_type"].append(st)
        out["subject_type_source"].append(source)
        out[schema.CLASS_PHRASE].append(concept.class_phrase if concept else None)
        out[schema.ITEMS].append(items)
    batch = batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    batch = batch.set_column(batch.schema.get_field_index("error"), "error", pa.array(error, pa.string()))
    for name, values in out.items():
        typ = pa.list_(ITEM_TYPE) if name == schema.ITEMS else pa.string()
        batch = batch.append_column(name, pa.array(values, typ))
    return batch.append_column("language", pa.array([opts.language] * n, pa.string()))
