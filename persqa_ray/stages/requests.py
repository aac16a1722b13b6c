"""Build requests: tag, seeded questions from the template file, and the user message per question.

A plain function over batches (Ray tasks, fused with the read): no state worth an actor.
The system prompt is the same for every request of a run, so the engine can cache its prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pyarrow as pa

from persqa_ray import schema
from persqa_ray.personalization.templates import TemplateSet, draw_questions, load_templates


@dataclass(frozen=True)
class RequestOptions:
    tag_name: str
    seed: int
    questions_per_image: int
    language: str
    templates_path: Optional[str] = None
    system_prompt: Optional[str] = None

    @property
    def tag(self) -> str:
        return f"<{self.tag_name}>"

    def templates(self) -> TemplateSet:
        return load_templates(self.language, self.templates_path)

    def render_system_prompt(self) -> str:
        return (self.system_prompt or self.templates().system_prompt).replace("{tag}", self.tag)


def user_message(ts: TemplateSet, question: str, tag: str) -> str:
    return ts.user_prompt.replace("{question}", question).replace("{tag}", tag)


def plan_questions(opts: RequestOptions, row_id: str, subject_type: Optional[str] = None):
    """(questions, template ids, user messages) for one row: the single source of the draw."""
    ts = opts.templates()
    chosen = draw_questions(ts, opts.seed, row_id, opts.questions_per_image, subject_type)
    questions = [t.render(opts.tag) for t in chosen]
    return questions, [t.id for t in chosen], [user_message(ts, q, opts.tag) for q in questions]


def build_requests(batch: pa.Table, opts: RequestOptions) -> pa.Table:
    n = batch.num_rows
    subject_types = [None] * n  # subject detection/columns: personalization issue
    questions, template_ids, prompts = [], [], []
    for row_id, st in zip(batch.column("row_id").to_pylist(), subject_types):
        q, t, p = plan_questions(opts, row_id, st)
        questions.append(q)
        template_ids.append(t)
        prompts.append(p)
    list_str = pa.list_(pa.string())
    return (batch
            .append_column("concept", pa.array([opts.tag_name] * n, pa.string()))
            .append_column("tag", pa.array([opts.tag] * n, pa.string()))
            .append_column("subject_type", pa.array(subject_types, pa.string()))
            .append_column("language", pa.array([opts.language] * n, pa.string()))
            .append_column(schema.QUESTIONS, pa.array(questions, list_str))
            .append_column(schema.TEMPLATE_IDS, pa.array(template_ids, list_str))
            .append_column(schema.PROMPTS, pa.array(prompts, list_str)))
