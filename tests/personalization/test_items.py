"""The families no other tool makes, item by item (no engine): multi-concept questions,
recognition on multi-concept rows with exact balance, text-only questions, reference images."""
import pyarrow as pa

from persqa_ray import schema
from persqa_ray.personalization.answers import accept_answer
from persqa_ray.personalization.concepts import Concept, ConceptRegistry
from persqa_ray.personalization.items import multi_items, recognition_items, references, text_items
from persqa_ray.personalization.options import PersonalizationOptions
from persqa_ray.stages.items import build_items

CHELSEA = Concept("chelsea", "<chelsea>", "the cat", "animal", ("/r/c1.jpg", "/r/c2.jpg", "/r/c3.jpg"))
EILEEN = Concept("eileen", "<eileen>", "the astronaut", "person", ("/r/e1.jpg",))
REGISTRY = ConceptRegistry(default="mam", registered=(CHELSEA, EILEEN), negatives="same_type",
                           known=("chelsea", "eileen", "lumiere", "espresso", "tom"),
                           types=(("lumiere", "person"), ("espresso", "object"), ("tom", "animal")))


def opts(**kw):
    base = dict(tag_name="mam", seed=0, questions_per_image=3, language="en", concepts=REGISTRY,
                concept_column="concept", recognition=True)
    return PersonalizationOptions(**{**base, **kw})


def test_multi_questions_name_the_concepts_and_ask_for_one_of_their_tags():
    items = multi_items(opts(), "r1", [EILEEN, CHELSEA])
    assert len(items) == 3 and len({it["template_id"] for it in items}) == 3
    for it in items:
        assert it["qa_type"] == "multi" and it["prefix"] is None and it["concept"] == "eileen+chelsea"
        assert set(it["tags"]) <= {"<eileen>", "<chelsea>"} and all(t in it["question"] for t in it["tags"])
        assert "<eileen> and <chelsea>" in it["system"] and it["question"] in it["prompt"]
    two = [it for it in multi_items(opts(questions_per_image=5), "r1", [EILEEN, CHELSEA]) if "left" in it["question"]]
    assert two[0]["question"] == "Who is on the left, <eileen> or <chelsea>?"


def test_the_answer_check_needs_every_tag_the_question_names():
    it = multi_items(opts(questions_per_image=5), "r1", [EILEEN, CHELSEA])[0]
    o = opts()
    assert accept_answer(o, it, "<chelsea> sits next to <eileen> on the grass.")[0] is not None
    answer, why = accept_answer(o, it, "<chelsea> sits on the grass.")
    assert answer is None and why == "answer does not name <eileen>"
    answer, why = accept_answer(o, it, "The cat sits next to <eileen>.")
    assert answer is None and why.startswith("answer does not start with one of <eileen> <chelsea>")


def test_recognition_on_a_multi_concept_row_is_balanced_and_never_asks_about_a_concept_shown():
    items = recognition_items(opts(), "r1", [EILEEN, CHELSEA])
    yes = [it for it in items if it["label"] == "yes"]
    no = [it for it in items if it["label"] == "no"]
    assert [it["concept"] for it in yes] == ["eileen", "chelsea"] and len(no) == 2   # one No per Yes: 50/50
    assert {it["concept"] for it in no}.isdisjoint({"eileen", "chelsea"}) and len({it["concept"] for it in no}) == 2
    assert [(it["concept"], it["negative_kind"]) for it in no] == [("lumiere", "same_type"), ("tom", "same_type")]


def test_same_type_negatives_of_a_person_are_the_other_person_every_time():
    for i in range(30):
        no = [it for it in recognition_items(opts(), f"row{i}", [EILEEN]) if it["label"] == "no"]
        assert [(it["concept"], it["negative_kind"]) for it in no] == [("lumiere", "same_type")]


def test_text_items_and_reference_images():
    items = text_items(opts(text_qa_per_concept=2), "t1", CHELSEA)
    assert [it["qa_type"] for it in items] == ["text", "text"] and all(it["prefix"] == "<chelsea>" for it in items)
    assert all(it["template_id"].startswith("en-txt-") and "<chelsea>" in it["question"] for it in items)
    assert references(opts(), [CHELSEA]) == ([], [])                         # off unless asked
    on = opts(reference_images_in_prompt=True, max_reference_images=3)
    assert references(on, [CHELSEA]) == (["/r/c1.jpg", "/r/c2.jpg", "/r/c3.jpg"], ["This is <chelsea>."] * 3)
    refs, captions = references(on, [EILEEN, CHELSEA])                       # in turn from each concept
    assert refs == ["/r/e1.jpg", "/r/c1.jpg", "/r/c2.jpg"]
    assert captions == ["This is <eileen>.", "This is <chelsea>.", "This is <chelsea>."]


def test_the_items_stage_lays_out_a_multi_concept_row():
    t = pa.table({"row_id": ["a", "b"], "image": [["x.jpg"], ["y.jpg"]], "status": [schema.OK] * 2,
                  "error": [None, None], "concept": [["eileen", "chelsea"], ["chelsea"]]})
    out = build_items(t, opts(reference_images_in_prompt=True)).to_pylist()
    assert out[0]["concept"] == "eileen+chelsea" and out[0]["tag"] == "<eileen> <chelsea>"
    assert out[0]["image_concepts"] == ["eileen", "chelsea"] and out[1]["image_concepts"] == ["chelsea"]
    assert [it["qa_type"] for it in out[0][schema.ITEMS]] == ["multi"] * 3 + ["recognition"] * 4
    assert out[0][schema.REF_IMAGES] == ["/r/e1.jpg", "/r/c1.jpg"]
    assert [it["qa_type"] for it in out[1][schema.ITEMS]] == ["open"] * 3 + ["recognition"] * 2
