"""The answer policy: which model answers are kept, and the seed's `pers_qa` text.

An answer passes when it starts with the tag, says something after it, is not a refusal, does not
call the subject by its class phrase instead of the tag, and is not just the question said back.
With MyVLM's substitution the model answered about the class phrase: every mention of it becomes
the tag first, then the same checks apply. Pure functions; the generate stage calls
`accept_answer` right after each engine call, because a failing answer is re-asked (new seed) on
the same engine before the row is written.
"""
from __future__ import annotations

import re
from typing import Optional

from persqa_ray.engines.base import GenerationRequest
from persqa_ray.personalization.options import PersonalizationOptions

_WORD = re.compile(r"\w", re.UNICODE)
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
# Refusals and assistant boilerplate, checked at the start of the answer (after the tag) or, for
# the unmistakable ones, anywhere in it.
_REFUSAL_START = re.compile(
    r"^\W*(i\s*(can(no|')?t|cannot|am\s+(unable|not\s+able)|'m\s+(unable|not\s+able|sorry)|"
    r"do\s*n[o']?t\s+know|apologi[sz]e)|sorry|unfortunately|抱歉|对不起|很抱歉|我无法|我不能|我没法|无法)",
    re.IGNORECASE)
_REFUSAL_ANYWHERE = re.compile(
    r"as an ai|as a language model|i am an ai|i'm an ai|作为(一个)?(人工智能|AI|语言模型)", re.IGNORECASE)


def _norm(text: str, tag: str) -> str:
    return _NON_WORD.sub(" ", text.replace(tag, " ")).strip().lower()


def check_answer(text: Optional[str], tag: str, *, question: Optional[str] = None,
                 class_phrase: Optional[str] = None) -> tuple[Optional[str], Optional[str]]:
    """(clean answer, None) when valid, else (None, reason)."""
    if text is None:
        return None, "no text returned"
    answer = text.strip()
    if not answer:
        return None, "empty answer"
    if not answer.startswith(tag):
        return None, f"answer does not start with {tag}: {answer[:60]!r}"
    rest = answer[len(tag):]
    if not _WORD.search(rest):
        return None, f"answer has nothing after {tag}"
    if _REFUSAL_START.search(rest) or _REFUSAL_ANYWHERE.search(answer):
        return None, f"answer is a refusal: {answer[:60]!r}"
    if class_phrase and re.search(re.escape(class_phrase), rest, re.IGNORECASE):
        return None, f"answer calls the subject {class_phrase!r} instead of {tag}"
    if question:
        a, q = _norm(answer, tag), _norm(question, tag)
        if a and (a == q or (len(a) < len(q) and q.startswith(a))):
            return None, "answer repeats the question"
    return answer, None


def substitute_phrase(text: Optional[str], phrase: str, tag: str) -> Optional[str]:
    """MyVLM's substitution: every mention of the class phrase ("The cat", "the cat's") becomes
    the tag. Case-insensitive; no word boundaries, so it works for Chinese phrases too."""
    if text is None:
        return None
    return re.sub(re.escape(phrase), lambda _: tag, text.strip(), flags=re.IGNORECASE)


def check_multi_answer(text: Optional[str], tags: list[str], question: str) -> tuple[Optional[str], Optional[str]]:
    """A multi-concept answer: starts with one of the tags, names every tag the question names,
    and passes the single-concept checks from the tag it starts with."""
    first = next((t for t in tags if (text or "").strip().startswith(t)), None)
    if first is None:
        return None, f"answer does not start with one of {' '.join(tags)}: {(text or '').strip()[:60]!r}"
    answer, reason = check_answer(text, first, question=question)
    if answer is None:
        return None, reason
    missing = [t for t in tags if t not in answer]
    if missing:
        return None, f"answer does not name {' '.join(missing)}"
    return answer, None


def accept_answer(opts: PersonalizationOptions, item: dict, text: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """The policy for one asked item's answer: (answer, None) to keep, (None, reason) to re-ask."""
    if item["tags"]:  # multi: one of several tags starts it, every named tag must appear
        return check_multi_answer(text, list(item["tags"]), item["question"])
    if opts.substitute and item["phrase"] and item["qa_type"] == "open":
        return check_answer(substitute_phrase(text, item["phrase"], item["tag"]), item["tag"],
                            question=item["question"])
    return check_answer(text, item["tag"], question=item["question"], class_phrase=item["phrase"])


def check_request(opts: PersonalizationOptions, item: dict, images: list, seed: int) -> GenerationRequest:
    """recognition_check: the item's Yes/No question to the VLM, its answer one of two labels."""
    labels = opts.templates().recognition.check_labels
    return GenerationRequest(system_prompt=item["system"], user_prompt=item["check"], images=images,
                             choices=(labels["yes"], labels["no"]), seed=seed)


def check_label(opts: PersonalizationOptions, text: Optional[str]) -> Optional[str]:
    """'yes' / 'no' for the VLM's answer to a recognition check (None: neither)."""
    got = (text or "").strip().lower()
    labels = opts.templates().recognition.check_labels
    return next((k for k, v in labels.items() if got == v.lower()), None)


def format_pers_qa(fmt: str, question: str, answer: str) -> str:
    # str.format on user text would choke on braces in the answer; substitute the two fields only.
    return fmt.replace("{question}", question).replace("{answer}", answer)
