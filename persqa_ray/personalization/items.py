"""Items: the QA rows a row will become, each with what the engine is asked and how.

qa_type (schema.QA_TYPES):
- open: a question for the VLM, drawn from the subject type's families and reproducible from
  (seed, row_id); with `substitute`, the VLM is asked about the class phrase instead of the tag
  (MyVLM). Rows whose subject must be detected get their open items once the VLM has answered
  (`items_after_detection`), from the same draw.
- recognition: "Is <tag> in this photo?", its answer built from its label: the row's own concept
  (yes) and another concept (no), one of each per concept shown, so labels are exactly 50/50. The
  'No' concept is a hard negative where the registry can find one (`ConceptRegistry.negative_for`).
- multi: a row showing several concepts (a list in the concept column) is asked questions naming
  them ("What are <a> and <b> doing?"); the answer starts with one of the tags and names each tag
  the question names.
- text: per concept, a question about its stable attributes, answered while the VLM looks at the
  concept's reference images, written as a text-only QA row (the concept rows of
  io/concept_rows.py).
"""
from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa

from persqa_ray.personalization.concepts import Concept
from persqa_ray.personalization.options import PersonalizationOptions
from persqa_ray.personalization.subjects import Subject
from persqa_ray.personalization.templates import draw_questions, row_rng

OPEN, RECOGNITION, MULTI, TEXT = "open", "recognition", "multi", "text"
ASKED = (OPEN, MULTI, TEXT)  # item types whose answer the VLM writes (recognition's is built)
ITEM_TYPE = pa.struct([(name, pa.string()) for name in (
    "qa_type", "concept", "tag", "question", "template_id", "system", "prompt", "prefix", "phrase",
    "answer", "label", "check", "negative_kind")] + [("tags", pa.list_(pa.string()))])


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


def recognition_items(opts: PersonalizationOptions, row_id: str, concepts: list[Concept]) -> list[dict]:
    """'Is <tag> in this photo?' for each concept shown (yes), then as many about concepts not
    shown (no), each a different one where the dataset has enough, chosen by the negative policy."""
    rec = opts.templates().recognition
    rng = row_rng(opts.seed, row_id, ":recognition")
    pairs = [(c, "yes", None) for c in concepts]
    exclude = frozenset(c.name for c in concepts)
    for c in concepts:
        negative, kind = opts.registry.negative_for(c, rng, exclude)
        if negative is not None:
            pairs.append((negative, "no", kind))
            exclude |= {negative.name}
    items = []
    for asked, label, kind in pairs:
        t = rng.choice(rec.templates)
        check = None
        if opts.recognition_check:
            check = rec.check_prompt.replace("{question}", t.render(asked.class_phrase or asked.tag))
        items.append(_item(qa_type=RECOGNITION, concept=asked.name, tag=asked.tag, question=t.render(asked.tag),
                           template_id=t.id, answer=rec.answer(label, asked.tag), label=label, check=check,
                           system=opts.system_prompt_for(asked.tag), negative_kind=kind))
    return items


def multi_items(opts: PersonalizationOptions, row_id: str, concepts: list[Concept]) -> list[dict]:
    """k questions naming the concepts of a multi-concept image."""
    multi = opts.templates().multi
    tags = [c.tag for c in concepts]
    joined = multi.join(tags)
    rng = row_rng(opts.seed, row_id, ":multi")
    items = []
    for t in rng.sample(multi.templates, min(opts.questions_per_image, len(multi.templates))):
        question = t.render_multi(tags, joined)
        items.append(_item(qa_type=MULTI, concept="+".join(c.name for c in concepts), tag=" ".join(tags),
                           question=question, template_id=t.id, tags=t.named_tags(tags),
                           system=multi.system_prompt.replace("{tags}", joined),
                           prompt=multi.user_prompt.replace("{question}", question).replace("{tags}", joined)))
    return items


def text_items(opts: PersonalizationOptions, row_id: str, concept: Concept) -> list[dict]:
    """text_qa_per_concept questions about a concept's stable attributes (its reference images
    are the images of the request)."""
    ts = opts.templates()
    rng = row_rng(opts.seed, row_id, ":text")
    return [_item(qa_type=TEXT, concept=concept.name, tag=concept.tag, question=t.render(concept.tag),
                  template_id=t.id, prefix=concept.tag, phrase=concept.class_phrase,
                  system=opts.system_prompt_for(concept.tag),
                  prompt=ts.user_prompt.replace("{question}", t.render(concept.tag)).replace("{tag}", concept.tag))
            for t in rng.sample(ts.text, min(opts.text_qa_per_concept, len(ts.text)))]


def references(opts: PersonalizationOptions, concepts: list[Concept]) -> tuple[list[str], list[str]]:
    """(images, captions) shown before the query image: up to max_reference_images, taken in turn
    from each concept (RAP's layout); none unless prompt.reference_images_in_prompt."""
    if not opts.reference_images_in_prompt:
        return [], []
    caption = opts.templates().reference_caption
    queues = [[(ref, caption.replace("{tag}", c.tag)) for ref in c.reference_images] for c in concepts]
    out: list[tuple[str, str]] = []
    while len(out) < opts.max_reference_images and any(queues):
        for q in queues:
            if q and len(out) < opts.max_reference_images:
                out.append(q.pop(0))
    return [r for r, _ in out], [c for _, c in out]


def row_items(opts: PersonalizationOptions, row_id: str, concepts: list[Concept], subject: Subject,
              text_row: bool = False) -> list[dict]:
    """Every item of an ok row known before generation (open items wait for a pending subject)."""
    if text_row:
        return text_items(opts, row_id, concepts[0])
    if len(concepts) > 1:
        items = multi_items(opts, row_id, concepts)
    else:
        items = [] if subject.pending else open_items(opts, row_id, concepts[0], subject.type)
    return items + (recognition_items(opts, row_id, concepts) if opts.recognition else [])


def items_after_detection(opts: PersonalizationOptions, row_id: str, concept_name: Optional[str],
                          subject: Subject, items: list[dict]) -> list[dict]:
    """A detected row's open items, drawn for the type the VLM named, before its other items."""
    concept, _ = opts.registry.resolve(concept_name)
    return open_items(opts, row_id, concept, subject.type) + list(items or [])
