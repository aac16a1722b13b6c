import copy
import random

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
    rng = random.Random(0)
    drawn = {r.negative_for(r.resolve("bo")[0], rng)[0].tag for _ in range(50)}
    assert drawn == {"<mam>", "<sks>"}
    assert r.negative_for(r.resolve("bo")[0], rng)[1] == "random"
    assert registry(known=("mam",)).negative_for(Concept("mam", "<mam>"), rng) == (None, "")  # one concept: none
    # the concepts shown in the image are never asked about as absent
    assert r.negative_for(r.resolve("bo")[0], rng, exclude=frozenset({"mam"}))[0].tag == "<sks>"


def test_hard_negatives_same_class_phrase_then_same_type_then_random():
    reg = ConceptRegistry(default="mam", negatives="same_type", known=("chelsea", "eileen", "lumiere", "tom", "mug"),
                          registered=(Concept("chelsea", "<chelsea>", "the cat", "animal"),
                                      Concept("tom", "<tom>", "the cat", None),
                                      Concept("eileen", "<eileen>", "the astronaut", "person")),
                          types=(("lumiere", "person"), ("mug", "object")))
    rng = random.Random(1)
    for _ in range(20):
        assert reg.negative_for(reg.resolve("chelsea")[0], rng) == (reg.resolve("tom")[0], "same_class_phrase")
        assert reg.negative_for(reg.resolve("eileen")[0], rng) == (reg.resolve("lumiere")[0], "same_type")
    concept, kind = reg.negative_for(reg.resolve("mug")[0], rng)   # the only object: no hard negative exists
    assert kind == "random" and concept.name != "mug"


def test_similar_negatives_follow_the_embedding_ranking():
    reg = ConceptRegistry(default="mam", negatives="similar", known=("a", "b", "c", "d", "e"),
                          similar=(("a", ("c", "b", "d", "e")),))
    rng = random.Random(2)
    got = {reg.negative_for(reg.resolve("a")[0], rng) for _ in range(60)}
    assert {c.name for c, _ in got} == {"b", "c", "d"} and {k for _, k in got} == {"similar"}  # the 3 most similar
    assert reg.negative_for(reg.resolve("b")[0], rng)[1] == "random"   # no embedding for b: no type either


def test_a_list_of_names_is_a_multi_concept_row():
    r = registry()
    concepts, why = r.resolve_all(["bo", "sks", "bo", " "])
    assert why is None and [c.tag for c in concepts] == ["<bo>", "<sks>"]   # de-duplicated, blanks dropped
    assert r.resolve_all(None)[0][0].tag == "<mam>" and r.resolve_all([])[0][0].tag == "<mam>"
    concepts, why = r.resolve_all(["bo", "two words"])
    assert concepts == [] and "'two words'" in why


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
