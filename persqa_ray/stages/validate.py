"""Validate model answers and format the seed's `pers_qa` text.

Pure functions: the generate stage calls them right after each engine call, because a failing
answer is re-asked (new seed) on the same engine before the row is written.
"""
from __future__ import annotations

import re
from typing import Optional

_WORD = re.compile(r"\w", re.UNICODE)


def check_answer(text: Optional[str], tag: str) -> tuple[Optional[str], Optional[str]]:
    """(clean answer, None) when valid, else (None, reason)."""
    if text is None:
        return None, "no text returned"
    answer = text.strip()
    if not answer:
        return None, "empty answer"
    if not answer.startswith(tag):
        return None, f"answer does not start with {tag}: {answer[:60]!r}"
    if not _WORD.search(answer[len(tag):]):
        return None, f"answer has nothing after {tag}"
    return answer, None


def format_pers_qa(fmt: str, question: str, answer: str) -> str:
    # str.format on user text would choke on braces in the answer; substitute the two fields only.
    return fmt.replace("{question}", question).replace("{answer}", answer)
