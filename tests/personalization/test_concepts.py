import copy

import pytest

from persqa_ray.config import ConfigError
from persqa_ray.personalization.concepts import Concept, ConceptRegistry, load_tokenizer, vocab_collision
from persqa_ray.pipeline import plan


def registry(**kw):
    base = dict(default="mam", registered=(Concept("bo", "<bo>", "the dog", "animal"),
                                           Concept("my cat", "<kit>", "the cat")), known=("bo", "mam", "sks"))
    base.update(kw)
    return ConceptRegistry(**base)


def test_resolve_registered_derived_default_and_refused():
    r = registry()
    assert r.resolve("bo")[0] == Concept("bo", "<bo>", "the dog", "animal")
    assert r.resolve("my cat")[0].tag == "<kit>"          # a registered name need not be a tag name
    assert r.resolve("sks") == (Concept("sks", "<sks>"), None)
    assert r.resolve(None)[0].tag == "<mam>" and r.resolve("  ")[0].tag == "<mam>"
    c, why = r.resolve("two words")
    assert c is None and "not registered under prompt.concepts" in why
    c, why = r.resolve("kit")                              # would steal the tag of "my cat"
    assert c is None and "<kit>, which concept 'my cat' already uses" in why
    c, why = registry(invalid=(("sks", "concept 'sks': a word"),)).resolve("sks")
    assert c is None and why == "concept 'sks': a word"


def test_negatives_are_other_concepts_of_the_input():
    r = registry()
    assert [c.tag for c in r.negatives_for(r.resolve("bo")[0])] == ["<mam>", "<sks>"]
    assert [c.tag for c in r.negatives_for(r.resolve(None)[0])] == ["<bo>", "<sks>"]
    assert registry(known=("mam",)).negatives_for(Concept("mam", "<mam>")) == []  # one concept: none


def test_vocab_collisions_with_the_real_tokenizer(tiny_model):
    tok = copy.deepcopy(load_tokenizer(tiny_model))
    assert "word of the model's vocabulary" in vocab_collision(tok, "cat")   # " cat" is one token
    assert vocab_collision(tok, "sks") is None and vocab_collision(tok, "mam") is None
    tok.add_tokens(["<bo>"])
    assert "already a token" in vocab_collision(tok, "bo")


def _cfg(tiny_model, tmp_path, **prompt):
    (tmp_path / "in.jsonl").write_text('{"image": "a.jpg"}\n')
    return {"input": {"path": str(tmp_path / "in.jsonl")}, "output": {"path": str(tmp_path / "out")},
            "engine": {"model": tiny_model}, "prompt": prompt}


def test_plan_refuses_or_warns_about_vocabulary_tags(tiny_model, tmp_path):
    concepts = {"cat": {"class_phrase": "the cat"}, "sks": {}}
    with pytest.raises(ConfigError) as e:
        plan(_cfg(tiny_model, tmp_path, concepts=concepts, tag_vocab_check="error"))
    assert str(e.value).startswith("prompt.concepts.cat: 'cat' is a word of the model's vocabulary")
    p = plan(_cfg(tiny_model, tmp_path, concepts=concepts))                 # default: warn
    assert len(p.warnings) == 1 and p.warnings[0].startswith("prompt.concepts.cat:")
    assert plan(_cfg(tiny_model, tmp_path, concepts=concepts, tag_vocab_check="off")).warnings == []
    with pytest.raises(ConfigError, match="prompt.tag: 'mug' is a word"):
        plan(_cfg(tiny_model, tmp_path, tag="mug", tag_vocab_check="error"))
