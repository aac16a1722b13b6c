"""Subject types: which question families a row gets (no hair colour for a mug).

In order: the row's `input.subject_type_column`, the concept's configured type, the VLM (a short
classification request under a choice constraint, asked in the generate stage), then
`prompt.default_subject_type`; otherwise the type stays unknown and only the families valid for
every type are asked. `Subject.source` says which one decided (schema.SUBJECT_SOURCES).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from persqa_ray.engines.base import GenerationRequest, GenerationResult
from persqa_ray.personalization.concepts import Concept
from persqa_ray.personalization.options import PersonalizationOptions
from persqa_ray.personalization.templates import SUBJECT_TYPES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subject:
    type: Optional[str]            # person | animal | object | None
    source: Optional[str]          # column | concept | detected | default | unknown; None while pending
    pending: bool = False          # the VLM decides it in the generate stage
    error: Optional[str] = None    # the column holds something that is not a subject type


def resolve_subject(opts: PersonalizationOptions, value: Any, concept: Optional[Concept]) -> Subject:
    """What is known of one row's subject before any engine call."""
    if value is not None and str(value).strip():
        st = str(value).strip().lower()
        if st in SUBJECT_TYPES:
            return Subject(st, "column")
        return Subject(None, None, error=f"{opts.subject_type_column} value {value!r} is not a subject type "
                                         f"({', '.join(SUBJECT_TYPES)})")
    if concept is not None and concept.subject_type:
        return Subject(concept.subject_type, "concept")
    if opts.detect_subject_type:
        return Subject(None, None, pending=True)
    return _fallback(opts)


def _fallback(opts: PersonalizationOptions) -> Subject:
    if opts.default_subject_type:
        return Subject(opts.default_subject_type, "default")
    return Subject(None, "unknown")


def classify_request(opts: PersonalizationOptions, images: list, seed: int) -> GenerationRequest:
    """The VLM's classification request: the answer is one of the template file's labels."""
    ts = opts.templates()
    return GenerationRequest(system_prompt=ts.classify_system_prompt, user_prompt=ts.classify_user_prompt,
                             images=images, choices=tuple(ts.classify_labels.values()), seed=seed)


def detected_subject(opts: PersonalizationOptions, row_id: str, result: GenerationResult) -> Subject:
    """The subject the VLM's answer names; a failed or unknown answer falls back to the default."""
    by_label = {label.lower(): st for st, label in opts.templates().classify_labels.items()}
    st = by_label.get((result.text or "").strip().lower()) if not result.error else None
    if st is None:
        log.warning("subject detection failed for row %s (%s): using the default", row_id,
                    result.error or repr(result.text))
        return _fallback(opts)
    return Subject(st, "detected")
