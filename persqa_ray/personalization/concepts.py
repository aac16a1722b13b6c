"""The concept registry: concept name -> tag (`<bo>`) and optional class phrase / subject type.

Concepts come from `prompt.concepts` in the config and from the input's concept column. A name
that is not registered gets the tag `<name>` when that is a valid bare tag name. Problems are
found before work starts where possible: two concepts with one tag, a tag the model's tokenizer
already knows as a token or as an ordinary word (the model would read `<cat>` as "cat"). A row
whose concept cannot get a tag becomes a `bad_concept` error row; nothing is dropped. A row may
name several concepts (a list): a multi-concept image. The registry also chooses the concept a
'No' recognition pair asks about (`negative_for`: hard negatives, after Yo'LLaVA).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

log = logging.getLogger(__name__)


def valid_tag_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "_-" for c in name)


@dataclass(frozen=True)
class Concept:
    name: str
    tag: str                           # rendered, e.g. "<bo>"
    class_phrase: Optional[str] = None  # "the cat": MyVLM substitution, the answer check, hard negatives
    subject_type: Optional[str] = None  # known type of this concept's subject, if configured
    reference_images: tuple[str, ...] = ()  # absolute paths or URLs (RAP's concept database)
    info: Optional[str] = None          # a description, for RAP's database


NEGATIVE_KINDS = ("same_class_phrase", "same_type", "similar", "random")


@dataclass(frozen=True)
class ConceptRegistry:
    default: str                                   # concept of rows with none (prompt.tag)
    registered: tuple[Concept, ...] = ()
    known: tuple[str, ...] = ()                    # concepts found in the input: recognition negatives
    invalid: tuple[tuple[str, str], ...] = ()      # (name, reason) found before work started
    types: tuple[tuple[str, str], ...] = ()        # input concepts' subject types (the concept pass)
    similar: tuple[tuple[str, tuple[str, ...]], ...] = ()  # concept -> others, most similar embedding first
    negatives: str = "random"                      # random | same_type | similar (prompt.recognition_negatives)
    _by_name: dict = field(init=False, compare=False, repr=False)
    _cache: dict = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {c.name: c for c in self.registered})
        object.__setattr__(self, "_cache", {"types": dict(self.types), "similar": dict(self.similar)})

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
        return Concept(name, tag), None  # its inferred type (types) serves negatives, not its rows' questions

    def resolve_all(self, value: Any) -> tuple[list[Concept], Optional[str]]:
        """A row's concepts: one for a name (or none: the default), several for a list of names
        (a multi-concept image); (concepts, None) or ([], reason)."""
        names = list(dict.fromkeys(str(v).strip() for v in value if v is not None and str(v).strip())) \
            if isinstance(value, (list, tuple)) else [value]
        out = []
        for name in names or [None]:
            concept, why = self.resolve(name)
            if concept is None:
                return [], why
            out.append(concept)
        return out, None

    def subject_type_of(self, concept: Concept) -> Optional[str]:
        return concept.subject_type or self._cache["types"].get(concept.name)

    def negative_pool(self) -> list[Concept]:
        """Every concept found in the input, sorted (reproducible draws), resolved once per process."""
        if "pool" not in self._cache:
            pool = [self.resolve(n)[0] for n in sorted(set(self.known))]
            self._cache["pool"] = [c for c in pool if c is not None]
        return self._cache["pool"]

    def negative_for(self, concept: Concept, rng, exclude: frozenset = frozenset()) -> tuple[Optional[Concept], str]:
        """Another concept to ask about in a 'No' recognition pair, and why it was chosen: the most
        similar by embedding (`similar`), else one with the same class phrase, else of the same
        subject type (`same_type`), else any (`random`)."""
        pool = [c for c in self.negative_pool() if c.tag != concept.tag and c.name not in exclude]
        if not pool:
            return None, ""
        if self.negatives == "similar":
            names = {c.name: c for c in pool}
            ranked = [names[n] for n in self._cache["similar"].get(concept.name, ()) if n in names]
            if ranked:
                return rng.choice(ranked[:3]), "similar"
        if self.negatives in ("same_type", "similar"):
            if concept.class_phrase:
                phrase = [c for c in pool if (c.class_phrase or "").lower() == concept.class_phrase.lower()]
                if phrase:
                    return rng.choice(phrase), "same_class_phrase"
            st = self.subject_type_of(concept)
            same = [c for c in pool if st and self.subject_type_of(c) == st]
            if same:
                return rng.choice(same), "same_type"
        return rng.choice(pool), "random"


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
