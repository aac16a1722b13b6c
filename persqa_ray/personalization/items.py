"""Items: the QA rows a row will become, each with what the engine is asked and how.

An open item is a question for the VLM, drawn from the subject type's families and reproducible
from (seed, row_id); with `substitute`, the VLM is asked about the class phrase instead of the tag
(MyVLM). A recognition item ("Is <tag> in this photo?") has its answer built from its label, with
the row's own concept (yes) and, when the dataset has other concepts, one of theirs (no): one of
each per image, so labels are exactly 50/50. Rows whose subject must be detected get their open
items once the VLM has answered (`items_after_detection`), from the same draw.
"""
from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa

from persqa_ray.personalization.concepts import Concept
from persqa_ray.personalization.options import PersonalizationOptions
from persqa_ray.personalization.subjects import Subject
from persqa_ray.personalization.templates import draw_questions, row_rng

OPEN, RECOGNITION = "open", "recognition"
ITEM_TYPE = pa.struct([(name, pa.string()) for name in (
    "qa_type", "concept", "tag", "question", "template_id", "system", "prompt", "prefix", "phrase",
    "answer", "label", "check")])


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _item(**kw) -> dict[str, Any]:
    return {name: kw.get(name) for name in ITEM_TYPE.names}


def class_phrase(opts: PersonalizationOptions, concept: Concept, subject_type: Optional[str]) -> str:
    return concept.class_phrase or opts.templates().class_phrases[subject_type or "unknown"]


def open_items(opts: PersonalizationOptions, row_id: str, concept: Concept, subject_type: Optional[str]) -> list[dict]:
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


def recognition_items(opts: PersonalizationOptions, row_id: str, concept: Concept) -> list[dict]:
    """'Is <tag> in this photo?' with the row's own concept (yes) and another concept's (no)."""
    rec = opts.templates().recognition
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


def row_items(opts: PersonalizationOptions, row_id: str, concept: Concept, subject: Subject) -> list[dict]:
    """Every item of an ok row known before generation (open items wait for a pending subject)."""
    items = [] if subject.pending else open_items(opts, row_id, concept, subject.type)
    return items + (recognition_items(opts, row_id, concept) if opts.recognition else [])


def items_after_detection(opts: PersonalizationOptions, row_id: str, concept_name: Optional[str],
                          subject: Subject, items: list[dict]) -> list[dict]:
    """A detected row's open items, drawn for the type the VLM named, before its other items."""
    concept, _ = opts.registry.resolve(concept_name)
    return open_items(opts, row_id, concept, subject.type) + list(items or [])
