"""Question templates (YAML data files, one per language) and the seeded draws from them.

A file holds the prompts (system, user, MyVLM-style substitution, subject classification), the
open-question families (appearance per subject type, activity and scene for every type), the
recognition templates with their label-built answers, the multi-concept family, the caption of a
reference image, and the text-only concept questions. `lint` refuses a file with duplicates,
missing or unknown placeholders, or two sentences run together.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import yaml

TEMPLATE_DIR = Path(__file__).parent / "templates"
SUBJECT_TYPES = ("person", "animal", "object")
LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class Template:
    id: str
    family: str
    text: str
    subject_types: tuple[str, ...]

    def render(self, tag: str) -> str:
        return self.text.replace("{tag}", tag)

    def render_multi(self, tags: list[str], joined: str) -> str:
        """A multi-concept question: {tags} is every tag joined, {tag1}/{tag2} the first two."""
        return self.text.replace("{tags}", joined).replace("{tag1}", tags[0]).replace("{tag2}", tags[1])

    def named_tags(self, tags: list[str]) -> list[str]:
        """The tags a multi-concept question names (the answer must name each of them)."""
        return list(tags) if "{tags}" in self.text else tags[:2]


@dataclass(frozen=True)
class Multi:
    system_prompt: str
    user_prompt: str
    sep: str                          # how {tags} joins tags: "<a>, <b> and <c>"
    last: str
    templates: tuple[Template, ...]

    def join(self, tags: list[str]) -> str:
        return tags[0] if len(tags) == 1 else self.sep.join(tags[:-1]) + self.last + tags[-1]


@dataclass(frozen=True)
class Recognition:
    yes_answer: str
    no_answer: str
    check_prompt: str
    check_labels: dict[str, str]      # {"yes": "Yes", "no": "No"}: the structured-output choices
    templates: tuple[Template, ...]

    def answer(self, label: str, tag: str) -> str:
        return (self.yes_answer if label == "yes" else self.no_answer).replace("{tag}", tag)


@dataclass(frozen=True)
class TemplateSet:
    prompt_version: str
    language: str
    system_prompt: str
    user_prompt: str
    pers_qa_format: str
    substitution_system_prompt: str
    substitution_user_prompt: str
    class_phrases: dict[str, str]     # subject type (or "unknown") -> default class phrase
    classify_system_prompt: str
    classify_user_prompt: str
    classify_labels: dict[str, str]   # subject type -> the label the model must answer with
    recognition: Recognition
    templates: tuple[Template, ...]
    multi: Optional[Multi] = None     # None: the file has no multi-concept family
    reference_caption: str = "This is {tag}."
    text: tuple[Template, ...] = ()   # text-only concept questions

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


def _templates(items, family: str, subject_types) -> tuple[Template, ...]:
    return tuple(Template(id=str(t["id"]), family=family, text=str(t["text"]),
                          subject_types=tuple(subject_types)) for t in items)


def _multi(spec: Optional[dict]) -> Optional[Multi]:
    if not spec:
        return None
    joiner = spec.get("tags_joiner") or {}
    return Multi(system_prompt=str(spec["system_prompt"]), user_prompt=str(spec["user_prompt"]),
                 sep=str(joiner.get("sep", ", ")), last=str(joiner.get("last", " and ")),
                 templates=_templates(spec["templates"], "multi", SUBJECT_TYPES))


def parse_templates(data: dict, source: str = "<templates>") -> TemplateSet:
    try:
        families = data["families"]
        templates = tuple(t for fam, spec in families.items()
                          for t in _templates(spec["templates"], fam, spec.get("subject_types", SUBJECT_TYPES)))
        sub, cls, rec = data["substitution"], data["classify"], data["recognition"]
        ts = TemplateSet(
            prompt_version=str(data["prompt_version"]), language=str(data["language"]),
            system_prompt=str(data["system_prompt"]), user_prompt=str(data["user_prompt"]),
            pers_qa_format=str(data.get("pers_qa_format", "Question: {question} Answer: {answer}")),
            substitution_system_prompt=str(sub["system_prompt"]), substitution_user_prompt=str(sub["user_prompt"]),
            class_phrases={str(k): str(v) for k, v in sub["class_phrases"].items()},
            classify_system_prompt=str(cls["system_prompt"]), classify_user_prompt=str(cls["user_prompt"]),
            classify_labels={str(k): str(v) for k, v in cls["labels"].items()},
            recognition=Recognition(
                yes_answer=str(rec["yes_answer"]), no_answer=str(rec["no_answer"]),
                check_prompt=str(rec["check_prompt"]),
                check_labels={str(k): str(v) for k, v in rec["check_labels"].items()},
                templates=_templates(rec["templates"], "recognition", SUBJECT_TYPES)),
            templates=templates, multi=_multi(data.get("multi")),
            reference_caption=str(data.get("reference_caption", "This is {tag}.")),
            text=_templates((data.get("text") or {}).get("templates", []), "text", SUBJECT_TYPES))
    except (KeyError, TypeError, AttributeError) as e:
        raise TemplateError(f"{source}: malformed template file ({type(e).__name__}: {e})") from None
    problems = lint(ts)
    if problems:
        raise TemplateError(f"{source}: " + "; ".join(problems))
    return ts


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# Two sentences run together: an end mark directly followed by a letter ("doing?Where") - what
# Python makes of two adjacent string literals with a missing comma (Yo'LLaVA's own list has it).
_JOINED = re.compile(r"[?!.？！。](?=[A-Za-z\u4e00-\u9fff{<])")
_QUESTION_MARKS = re.compile(r"[?？]")


def _placeholder_problems(name: str, text: str, allowed: set[str], required: set[str]) -> list[str]:
    found = set(_PLACEHOLDER.findall(text))
    out = [f"{name}: unknown placeholder {{{p}}}" for p in sorted(found - allowed)]
    out += [f"{name}: no {{{p}}} placeholder" for p in sorted(required - found)]
    return out


def _template_problems(templates, allowed: set[str], seen: tuple[set, set]) -> list[str]:
    """Duplicates (ids and texts, across the whole file), placeholders, run-together sentences."""
    seen_ids, seen_texts = seen
    problems = []
    for t in templates:
        if t.id in seen_ids:
            problems.append(f"duplicate template id {t.id}")
        if t.text.strip().lower() in seen_texts:
            problems.append(f"duplicate template text {t.text!r}")
        seen_ids.add(t.id)
        seen_texts.add(t.text.strip().lower())
        found = set(_PLACEHOLDER.findall(t.text))
        problems += [f"{t.id}: unknown placeholder {{{p}}}" for p in sorted(found - allowed)]
        if allowed == {"tag"} and "tag" not in found:
            problems.append(f"{t.id}: no {{tag}} placeholder")
        if allowed != {"tag"} and "tags" not in found and not {"tag1", "tag2"} <= found:
            problems.append(f"{t.id}: a multi-concept question needs {{tags}} or both {{tag1}} and {{tag2}}")
        if len(_QUESTION_MARKS.findall(t.text)) > 1 or _JOINED.search(t.text.rstrip()):
            problems.append(f"{t.id}: two sentences run together (a missing comma between string "
                            f"literals?): {t.text!r}")
        if bad := set(t.subject_types) - set(SUBJECT_TYPES):
            problems.append(f"{t.id}: unknown subject types {sorted(bad)}")
    return problems


def lint(ts: TemplateSet) -> list[str]:
    """Problems that would silently corrupt a dataset."""
    seen: tuple[set, set] = (set(), set())
    problems = _template_problems(ts.templates + ts.recognition.templates + ts.text, {"tag"}, seen)
    checks = [("system_prompt", ts.system_prompt, {"tag"}, {"tag"}),
              ("user_prompt", ts.user_prompt, {"tag", "question"}, {"tag", "question"}),
              ("pers_qa_format", ts.pers_qa_format, {"question", "answer"}, {"question", "answer"}),
              ("substitution.system_prompt", ts.substitution_system_prompt, {"class_phrase"}, {"class_phrase"}),
              ("substitution.user_prompt", ts.substitution_user_prompt, {"class_phrase", "question"},
               {"class_phrase", "question"}),
              ("classify.user_prompt", ts.classify_user_prompt, set(), set()),
              ("recognition.yes_answer", ts.recognition.yes_answer, {"tag"}, {"tag"}),
              ("recognition.no_answer", ts.recognition.no_answer, {"tag"}, {"tag"}),
              ("recognition.check_prompt", ts.recognition.check_prompt, {"question"}, {"question"}),
              ("reference_caption", ts.reference_caption, {"tag"}, {"tag"})]
    if ts.multi is not None:
        problems += _template_problems(ts.multi.templates, {"tags", "tag1", "tag2"}, seen)
        checks += [("multi.system_prompt", ts.multi.system_prompt, {"tags"}, {"tags"}),
                   ("multi.user_prompt", ts.multi.user_prompt, {"tags", "question"}, {"tags", "question"})]
    for name, text, allowed, required in checks:
        problems += _placeholder_problems(name, text, allowed, required)
    if set(ts.classify_labels) != set(SUBJECT_TYPES):
        problems.append(f"classify.labels: must map exactly {list(SUBJECT_TYPES)}")
    if set(ts.class_phrases) != set(SUBJECT_TYPES) | {"unknown"}:
        problems.append(f"substitution.class_phrases: must map exactly {list(SUBJECT_TYPES) + ['unknown']}")
    if set(ts.recognition.check_labels) != {"yes", "no"}:
        problems.append("recognition.check_labels: must map exactly yes and no")
    if not ts.recognition.templates:
        problems.append("recognition: no templates")
    if not ts.families_for(None):
        problems.append("no family is valid for every subject type (needed when the type is unknown)")
    return problems


@lru_cache(maxsize=16)
def load_templates(language: str = "en", path: Optional[str] = None) -> TemplateSet:
    p = Path(path) if path else TEMPLATE_DIR / f"{language}.yaml"
    if not p.is_file():
        raise TemplateError(f"template file not found: {p}")
    ts = parse_templates(yaml.safe_load(p.read_text(encoding="utf-8")), str(p))
    if ts.language != language:
        raise TemplateError(f"{p}: a '{ts.language}' template file, but prompt.language is '{language}'")
    return ts


def row_rng(seed: int, row_id: str, purpose: str = "") -> random.Random:
    # str seeds hash with sha512: stable across processes and machines (unlike hash()).
    return random.Random(f"persqa:{seed}:{row_id}{purpose}")


def draw_questions(ts: TemplateSet, seed: int, row_id: str, k: int,
                   subject_type: Optional[str] = None) -> list[Template]:
    """k distinct templates, spread over the eligible families, fixed by (seed, row_id).

    Families are visited round-robin in a seeded order, so k=3 over 3 families asks one question
    of each; a family that runs out is skipped. Fewer than k come back only if the eligible
    templates number fewer than k.
    """
    rng = row_rng(seed, row_id)
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
