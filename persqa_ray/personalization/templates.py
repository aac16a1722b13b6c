"""Question templates (YAML data files) and the seeded draw of k distinct questions per row."""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import yaml

TEMPLATE_DIR = Path(__file__).parent / "templates"
SUBJECT_TYPES = ("person", "animal", "object")


@dataclass(frozen=True)
class Template:
    id: str
    family: str
    text: str
    subject_types: tuple[str, ...]

    def render(self, tag: str) -> str:
        return self.text.replace("{tag}", tag)


@dataclass(frozen=True)
class TemplateSet:
    prompt_version: str
    language: str
    system_prompt: str
    user_prompt: str
    templates: tuple[Template, ...]

    def families_for(self, subject_type: Optional[str]) -> dict[str, list[Template]]:
        """Families usable for a subject type; unknown type: only families valid for every type."""
        wanted = set(SUBJECT_TYPES) if subject_type is None else {subject_type}
        out: dict[str, list[Template]] = {}
        for t in self.templates:
            if wanted <= set(t.subject_types):
                out.setdefault(t.family, []).append(t)
        return out


class TemplateError(ValueError):
    pass


def parse_templates(data: dict, source: str = "<templates>") -> TemplateSet:
    try:
        families = data["families"]
        templates = tuple(
            Template(id=str(t["id"]), family=fam, text=str(t["text"]),
                     subject_types=tuple(spec.get("subject_types", SUBJECT_TYPES)))
            for fam, spec in families.items() for t in spec["templates"])
        ts = TemplateSet(prompt_version=str(data["prompt_version"]), language=str(data["language"]),
                         system_prompt=str(data["system_prompt"]), user_prompt=str(data["user_prompt"]),
                         templates=templates)
    except (KeyError, TypeError, AttributeError) as e:
        raise TemplateError(f"{source}: malformed template file ({type(e).__name__}: {e})") from None
    problems = lint(ts)
    if problems:
        raise TemplateError(f"{source}: " + "; ".join(problems))
    return ts


def lint(ts: TemplateSet) -> list[str]:
    """Problems that would silently corrupt a dataset: duplicate ids/texts, missing tag, bad types."""
    problems = []
    seen_ids, seen_texts = set(), set()
    for t in ts.templates:
        if t.id in seen_ids:
            problems.append(f"duplicate template id {t.id}")
        if t.text.strip().lower() in seen_texts:
            problems.append(f"duplicate template text {t.text!r}")
        seen_ids.add(t.id)
        seen_texts.add(t.text.strip().lower())
        if "{tag}" not in t.text:
            problems.append(f"{t.id}: no {{tag}} placeholder")
        if bad := set(t.subject_types) - set(SUBJECT_TYPES):
            problems.append(f"{t.id}: unknown subject types {sorted(bad)}")
    for name, text in (("system_prompt", ts.system_prompt), ("user_prompt", ts.user_prompt)):
        if "{tag}" not in text:
            problems.append(f"{name}: no {{tag}} placeholder")
    if "{question}" not in ts.user_prompt:
        problems.append("user_prompt: no {question} placeholder")
    if not ts.families_for(None):
        problems.append("no family is valid for every subject type (needed when the type is unknown)")
    return problems


@lru_cache(maxsize=16)
def load_templates(language: str = "en", path: Optional[str] = None) -> TemplateSet:
    p = Path(path) if path else TEMPLATE_DIR / f"{language}.yaml"
    if not p.is_file():
        raise TemplateError(f"template file not found: {p}")
    return parse_templates(yaml.safe_load(p.read_text(encoding="utf-8")), str(p))


def draw_questions(ts: TemplateSet, seed: int, row_id: str, k: int,
                   subject_type: Optional[str] = None) -> list[Template]:
    """k distinct templates, spread over the eligible families, fixed by (seed, row_id).

    Families are visited round-robin in a seeded order, so k=3 over 3 families asks one question
    of each; a family that runs out is skipped. Fewer than k come back only if the eligible
    templates number fewer than k.
    """
    rng = random.Random(f"persqa:{seed}:{row_id}")  # str seeds hash with sha512: stable across processes
    families = ts.families_for(subject_type)
    order = sorted(families)
    rng.shuffle(order)
    pools = {f: rng.sample(families[f], len(families[f])) for f in order}
    chosen: list[Template] = []
    while len(chosen) < k and any(pools.values()):
        for f in order:
            if pools[f] and len(chosen) < k:
                chosen.append(pools[f].pop())
    return chosen
