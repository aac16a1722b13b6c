"""The concept registry: concept name -> tag (`<bo>`) and optional class phrase / subject type.

Concepts come from `prompt.concepts` in the config and from the input's concept column. A name
that is not registered gets the tag `<name>` when that is a valid bare tag name. Problems are
found before work starts where possible: two concepts with one tag, a tag the model's tokenizer
already knows as a token or as an ordinary word (the model would read `<cat>` as "cat"). A row
whose concept cannot get a tag becomes a `bad_concept` error row; nothing is dropped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

log = logging.getLogger(__name__)


def valid_tag_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "_-" for c in name)


@dataclass(frozen=True)
class Concept:
    name: str
    tag: str                           # rendered, e.g. "<bo>"
    class_phrase: Optional[str] = None  # "the cat": MyVLM substitution, and the answer check
    subject_type: Optional[str] = None  # known type of this concept's subject, if configured


@dataclass(frozen=True)
class ConceptRegistry:
    default: str                                   # concept of rows with none (prompt.tag)
    registered: tuple[Concept, ...] = ()
    known: tuple[str, ...] = ()                    # concepts found in the input: recognition negatives
    invalid: tuple[tuple[str, str], ...] = ()      # (name, reason) found before work started
    _by_name: dict = field(init=False, compare=False, repr=False)
    _cache: dict = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {c.name: c for c in self.registered})
        object.__setattr__(self, "_cache", {})

    def resolve(self, name: Optional[str]) -> tuple[Optional[Concept], Optional[str]]:
        """(concept, None) or (None, reason) for a row's concept value (None: the default)."""
        name = self.default if name is None or str(name).strip() == "" else str(name).strip()
        if name in self._by_name:
            return self._by_name[name], None
        for bad, reason in self.invalid:
            if bad == name:
                return None, reason
        if not valid_tag_name(name):
            return None, (f"concept {name!r} is not registered under prompt.concepts and is not a bare "
                          f"tag name (letters, digits, '_' or '-')")
        tag = f"<{name}>"
        for c in self.registered:
            if c.tag == tag:
                return None, f"concept {name!r} would get tag {tag}, which concept {c.name!r} already uses"
        return Concept(name, tag), None

    def negatives_for(self, concept: Concept) -> list[Concept]:
        """Other concepts of the dataset, for 'No' recognition pairs (sorted: reproducible draws)."""
        if "pool" not in self._cache:  # resolved once per process, not per row
            pool = [self.resolve(n)[0] for n in sorted(set(self.known))]
            self._cache["pool"] = [c for c in pool if c is not None]
        return [c for c in self._cache["pool"] if c.tag != concept.tag]


@lru_cache(maxsize=4)
def load_tokenizer(model: str):
    """The model's tokenizer from a local directory or the local HF cache; None if unavailable
    (a hub id on a machine without it cached: the vocabulary check is then skipped, and said so)."""
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        log.warning("tag vocabulary check skipped: cannot load the tokenizer of %s (%s)", model, type(e).__name__)
        return None


def vocab_collision(tokenizer, name: str) -> Optional[str]:
    """Why `<name>` is a poor tag for this tokenizer, or None."""
    tag = f"<{name}>"
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    if tag in tokenizer.get_vocab() or tag in specials:
        return f"{tag} is already a token of the model's vocabulary"
    # A word of the vocabulary is one token with its leading space (" cat" -> "Ġcat" / "▁cat").
    if len(tokenizer.encode(f" {name}", add_special_tokens=False)) == 1:
        return (f"'{name}' is a word of the model's vocabulary (one token), so the model may read "
                f"{tag} as that word; pick a rarer name")
    return None
