import pyarrow as pa

from persqa_ray import schema
from persqa_ray.personalization.concepts import Concept, ConceptRegistry
from persqa_ray.personalization.items import open_items
from persqa_ray.personalization.options import PersonalizationOptions
from persqa_ray.stages.items import build_items


def opts(**kw):
    base = dict(tag_name="mam", seed=0, questions_per_image=1, language="en")
    base.update(kw)
    return PersonalizationOptions(**base)


def batch(n=3):
    return pa.table({"row_id": [f"r{i}" for i in range(n)], "image": [["a.jpg"]] * (n - 1) + [["a.jpg", "b.jpg"]],
                     "status": [schema.OK] * n, "error": [None] * n})


def test_single_and_multi_image_rows_get_k_questions():
    out = build_items(batch(), opts(questions_per_image=2))
    items = out.column(schema.ITEMS).to_pylist()
    assert [len(row) for row in items] == [2, 2, 2]  # the two-image row still gets k QA, not k per image
    assert all("<mam>" in it["question"] and it["qa_type"] == "open" for row in items for it in row)
    assert out.column("tag").to_pylist() == ["<mam>"] * 3 and out.column("concept").to_pylist() == ["mam"] * 3
    assert all(it["prompt"].startswith(it["question"]) and "starting your answer with <mam>" in it["prompt"]
               and it["prefix"] == "<mam>" for row in items for it in row)


def test_same_seed_same_questions_other_tag():
    a = [[it["template_id"] for it in row] for row in build_items(batch(), opts()).column(schema.ITEMS).to_pylist()]
    b = [[it["template_id"] for it in row] for row in build_items(batch(), opts()).column(schema.ITEMS).to_pylist()]
    assert a == b
    bo = opts(tag_name="bo")
    items = open_items(bo, "r0", bo.registry.resolve(None)[0], None)
    assert "<bo>" in items[0]["question"] and [it["template_id"] for it in items] == a[0]  # the text, not the draw
    assert "<bo>" in items[0]["system"] and "{tag}" not in items[0]["system"]  # the system prompt names the tag


def test_empty_subject_column_falls_back_and_bad_value_is_an_error_row():
    t = batch(4).append_column("kind", pa.array(["Person", None, "dog", "object"]))
    out = build_items(t, opts(subject_type_column="kind", default_subject_type="animal",
                                 questions_per_image=3)).to_pylist()
    assert [r["subject_type"] for r in out] == ["person", "animal", None, "object"]
    assert [r["subject_type_source"] for r in out] == ["column", "default", None, "column"]
    assert out[2]["status"] == schema.BAD_RECORD and "'dog' is not a subject type" in out[2]["error"]
    assert out[2][schema.ITEMS] == []   # an error row asks nothing
    # the family choice is exact: an object is never asked about hair, a person never about material
    assert all(it["template_id"].startswith(("en-act", "en-scn", "en-app-p")) for it in out[0][schema.ITEMS])
    assert all(it["template_id"].startswith(("en-act", "en-scn", "en-app-o")) for it in out[3][schema.ITEMS])


def test_detection_rows_wait_for_the_vlm():
    out = build_items(batch(), opts(detect_subject_type=True, recognition=True)).to_pylist()
    # pending: no source yet (one of schema.SUBJECT_SOURCES is written once the VLM has answered)
    assert all(r[schema.DETECT] and r["subject_type_source"] is None and r["subject_type"] is None for r in out)
    # open questions are drawn after detection (generate stage); recognition does not need the type
    assert all([it["qa_type"] for it in r[schema.ITEMS]] == ["recognition"] for r in out)


def test_concepts_from_a_column_and_balanced_recognition_pairs():
    reg = ConceptRegistry(default="mam", registered=(Concept("bo", "<bo>", "the dog", "animal"),),
                          known=("bo", "mam", "sks", "zed"))
    n = 200
    names = ["bo", "sks", None, "zed"] * (n // 4)
    t = pa.table({"row_id": [f"r{i}" for i in range(n)], "image": [["a.jpg"]] * n, "status": [schema.OK] * n,
                  "error": [None] * n, "who": names})
    out = build_items(t, opts(concepts=reg, concept_column="who", recognition=True, recognition_check=True)).to_pylist()
    assert [r["tag"] for r in out[:4]] == ["<bo>", "<sks>", "<mam>", "<zed>"]
    assert out[0]["subject_type"] == "animal" and out[0]["subject_type_source"] == "concept"
    rec = [it for r in out for it in r[schema.ITEMS] if it["qa_type"] == "recognition"]
    yes = [it for it in rec if it["label"] == "yes"]
    no = [it for it in rec if it["label"] == "no"]
    assert len(yes) == len(no) == n  # one of each per image: exactly 50/50
    for r in out:
        pos, neg = [it for it in r[schema.ITEMS] if it["qa_type"] == "recognition"]
        assert pos["tag"] == r["tag"] and pos["answer"] == f"Yes, {r['tag']} is in this photo."
        assert neg["tag"] != r["tag"] and neg["answer"] == f"No, {neg['tag']} is not in this photo."
        assert neg["question"].count(neg["tag"]) == 1
    assert {it["tag"] for it in no} == {"<bo>", "<sks>", "<mam>", "<zed>"}   # every concept serves as a negative
    # the check asks the VLM with the class phrase where one is registered
    assert any(it["check"].startswith(("Is the dog", "Can you see the dog", "Does this picture show the dog",
                                       "Do you spot the dog")) for it in rec if it["tag"] == "<bo>")


def test_single_concept_has_no_negatives_and_k_open_items_come_first():
    out = build_items(batch(), opts(recognition=True, questions_per_image=2)).to_pylist()
    assert all([it["qa_type"] for it in r[schema.ITEMS]] == ["open", "open", "recognition"] for r in out)
    assert all(r[schema.ITEMS][2]["label"] == "yes" for r in out)


def test_substitution_asks_with_the_class_phrase():
    reg = ConceptRegistry(default="mam", registered=(Concept("bo", "<bo>", "the dog", "animal"),))
    t = batch(2).append_column("who", pa.array(["bo", None]))
    out = build_items(t, opts(concepts=reg, concept_column="who", substitute=True,
                                 default_subject_type="person")).to_pylist()
    dog, person = out[0][schema.ITEMS][0], out[1][schema.ITEMS][0]
    assert "<bo>" in dog["question"] and "<bo>" not in dog["prompt"] and "the dog" in dog["prompt"].lower()
    assert dog["prefix"] == "The dog" and dog["phrase"] == "the dog" and "the dog" in dog["system"]
    assert person["phrase"] == "the person" and "<mam>" in person["question"]


def test_unusable_concept_is_an_error_row():
    t = batch(2).append_column("who", pa.array(["two words", "ok_name"]))
    out = build_items(t, opts(concept_column="who")).to_pylist()
    assert out[0]["status"] == schema.BAD_CONCEPT and "'two words'" in out[0]["error"]
    assert out[1]["status"] == schema.OK and out[1]["tag"] == "<ok_name>"
