"""The personalization settings of a run, resolved once on the driver from `prompt` and `input`.

One copy travels to the stages that need it (items, generate); the concept pass
(`pipeline/concepts.py`) replaces it once with the input's concepts added.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from persqa_ray import schema
from persqa_ray.personalization.concept_table import load_concepts_table, resolve_ref
from persqa_ray.personalization.concepts import Concept, ConceptRegistry
from persqa_ray.personalization.templates import TemplateSet, load_templates


@dataclass(frozen=True)
class PersonalizationOptions:
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
    reference_images_in_prompt: bool = False
    max_reference_images: int = 2
    text_qa_per_concept: int = 0
    _registry: dict = field(init=False, default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg) -> "PersonalizationOptions":
        """Raises ConceptTableError for an unreadable input.concepts_table."""
        pr, inp = cfg.prompt, cfg.input
        registered = [Concept(name, f"<{c.tag or name}>", c.class_phrase, c.subject_type,
                              tuple(resolve_ref(r, os.getcwd()) for r in c.reference_images), c.info)
                      for name, c in pr.concepts.items()]
        if inp.concepts_table:  # prompt.concepts entries win
            names = {c.name for c in registered}
            registered += [c for c in load_concepts_table(inp.concepts_table, inp.storage_options)
                           if c.name not in names]
        known_types = any(c.subject_type for c in registered) or bool(inp.subject_type_column)
        registry = ConceptRegistry(default=pr.tag, registered=tuple(registered), negatives=pr.recognition_negatives
                                   or ("same_type" if known_types else "random"))
        column = (lambda name: schema.input_column_name(name) if name else None)
        return cls(tag_name=pr.tag, seed=pr.seed, questions_per_image=pr.questions_per_image, language=pr.language,
                   templates_path=pr.templates, system_prompt=pr.system_prompt, concepts=registry,
                   concept_column=column(inp.concept_column), subject_type_column=column(inp.subject_type_column),
                   detect_subject_type=pr.detect_subject_type, default_subject_type=pr.default_subject_type,
                   recognition=pr.recognition, recognition_check=pr.recognition_check,
                   substitute=pr.substitute_class_phrase, reference_images_in_prompt=pr.reference_images_in_prompt,
                   max_reference_images=pr.max_reference_images, text_qa_per_concept=pr.text_qa_per_concept)

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
