"""Export builders on hand-made rows: conversation shape, concept split, leaks, bad specs."""
import json

import pytest

from persqa_ray.export import (
    ExportError,
    Images,
    RapDatabase,
    _Writer,
    parse_split,
    split_by_concept,
    to_jsonl,
    to_llava,
    to_sharegpt,
)


def row(rid, k, concept, image_concept=None, qa_type="open", q="Q", a="A", images=("/d/x.jpg",)):
    return {"row_id": rid, "qa_index": k, "concept": concept, "image_concept": image_concept or concept,
            "tag": f"<{concept}>", "qa_type": qa_type, "question": f"{q}{k}", "answer": f"{a}{k}",
            "image": list(images), "label": None}


def test_llava_and_sharegpt_conversations():
    rows = [row("r1", 0, "bo"), row("r1", 1, "bo"), row("r2", 0, "sks", images=("/d/a.jpg", "/d/b.jpg"))]
    llava = to_llava(rows, Images([], "/d"))
    assert llava[0] == {"id": "r1", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nQ0"}, {"from": "gpt", "value": "A0"},
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}]}
    assert llava[1]["image"] == ["a.jpg", "b.jpg"] and llava[1]["conversations"][0]["value"] == "<image>\n<image>\nQ0"
    sg = to_sharegpt(rows, Images([], None))
    assert sg[1]["images"] == ["/d/a.jpg", "/d/b.jpg"] and sg[1]["messages"][0]["content"] == "<image><image>Q0"
    assert [m["role"] for m in sg[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [r["qa_index"] for r in to_jsonl(rows, Images([], None))] == [0, 1, 0]


def test_concept_split_keeps_concepts_apart_and_drops_leaking_no_pairs():
    concepts = [f"c{i}" for i in range(10)]
    rows = []
    for i, c in enumerate(concepts):
        rows += [row(f"r{i}", 0, c), row(f"r{i}", 1, concepts[(i + 1) % 10], image_concept=c, qa_type="recognition")]
    parts, info = split_by_concept(rows, 0.8, seed=3)
    assert len(info["train_concepts"]) == 8 and len(info["test_concepts"]) == 2
    train_c, test_c = set(info["train_concepts"]), set(info["test_concepts"])
    for part, side in (("train", train_c), ("test", test_c)):
        assert all(r["image_concept"] in side and r["concept"] in side for r in parts[part])
    kept = len(parts["train"]) + len(parts["test"])
    assert kept + info["cross_split_pairs_dropped"] == len(rows) and info["cross_split_pairs_dropped"] >= 1
    assert split_by_concept(rows, 0.8, seed=3)[1] == info            # reproducible
    assert split_by_concept(rows, 0.8, seed=4)[1]["test_concepts"] != info["test_concepts"] or \
        split_by_concept(rows, 0.8, seed=5)[1]["test_concepts"] != info["test_concepts"]


def test_bad_split_specs_and_single_concept():
    for spec in ("concept:0", "concept:1", "image:0.8", "concept:x"):
        with pytest.raises(ExportError):
            parse_split(spec)
    assert parse_split("concept:0.75") == 0.75 and parse_split(None) is None
    with pytest.raises(ExportError, match="at least 2 concepts"):
        split_by_concept([row("r", 0, "bo")], 0.8)


CONCEPTS = [{"name": "chelsea", "tag": "<chelsea>", "class_phrase": "the cat", "subject_type": "animal",
             "reference_images": ["/d/refs/c1.jpg", "/d/refs/c2.jpg"], "info": None},
            {"name": "eileen", "tag": "<eileen>", "class_phrase": None, "subject_type": "person",
             "reference_images": [], "info": "<eileen> is an astronaut."}]


def test_reference_images_come_first_with_their_captions_and_text_rows_have_no_image():
    ref = {**row("r1", 0, "chelsea"), "reference_images": ["/d/refs/c1.jpg", "/d/refs/c2.jpg"], "language": "en"}
    text = {**row("t1", 0, "chelsea", qa_type="text", images=("/d/refs/c1.jpg", "/d/refs/c2.jpg")), "language": "en"}
    images = Images(CONCEPTS, "/d")
    llava = to_llava([ref, text], images)
    assert llava[0]["image"] == ["refs/c1.jpg", "refs/c2.jpg", "x.jpg"]   # three images, in order
    assert llava[0]["conversations"][0]["value"] == \
        "<image>\nThis is <chelsea>.\n<image>\nThis is <chelsea>.\n<image>\nQ0"
    assert "image" not in llava[1] and "<image>" not in json.dumps(llava[1])   # text-only
    sg = to_sharegpt([ref, text], images)
    assert sg[0]["images"] == ["refs/c1.jpg", "refs/c2.jpg", "x.jpg"] and sg[0]["messages"][0]["content"].count(
        "<image>") == 3
    assert sg[1]["images"] == [] and "<image>" not in sg[1]["messages"][0]["content"]


def test_a_multi_concept_row_stays_on_one_side_or_is_dropped():
    concepts = [f"c{i}" for i in range(10)]
    rows = [row(f"r{i}", 0, c) for i, c in enumerate(concepts)]
    rows += [{**row(f"m{i}", 0, f"{a}+{b}", image_concept=f"{a}+{b}", qa_type="multi"), "image_concepts": [a, b]}
             for i, (a, b) in enumerate(zip(concepts, concepts[1:]))]
    parts, info = split_by_concept(rows, 0.5, seed=1)
    side = {c: "train" for c in info["train_concepts"]} | {c: "test" for c in info["test_concepts"]}
    for part in ("train", "test"):
        for r in parts[part]:
            assert all(side[c] == part for c in r.get("image_concepts") or [r["image_concept"]])
    crossing = sum(1 for a, b in zip(concepts, concepts[1:]) if side[a] != side[b])
    assert crossing >= 1 and info["cross_split_pairs_dropped"] == crossing


def test_rap_database_in_raps_layout(tmp_path):
    db = RapDatabase(CONCEPTS, None)
    db.see([{**row("t", 0, "chelsea", qa_type="text", a="<chelsea> is a tabby cat"), "image_concepts": ["chelsea"]},
            {**row("e", 0, "eileen"), "image_concepts": ["eileen"]}])
    assert db.write(str(tmp_path / "database.json"), None) == 2
    got = json.loads((tmp_path / "database.json").read_text())
    assert got["concept_dict"]["<chelsea>"] == {"name": "chelsea", "image": "/d/refs/c1.jpg",
                                                "info": "<chelsea> is a tabby cat0", "category": "cat"}
    assert got["concept_dict"]["<eileen>"] == {"name": "eileen", "image": "/d/x.jpg",
                                               "info": "<eileen> is an astronaut.", "category": "person"}
    assert got["path_to_concept"] == {"/d/refs/c1.jpg": "<chelsea>", "/d/refs/c2.jpg": "<chelsea>",
                                      "/d/x.jpg": "<eileen>"}


def test_jsonl_lines_survive_any_line_splitter(tmp_path):
    """A random model's answer held U+0085: JSON keeps it raw, str.splitlines breaks the line there."""
    answer = "<mam> a\x85b\u2028c\u2029d"
    w = _Writer("jsonl", str(tmp_path / "x.jsonl"), None)
    w.write([{"answer": answer}, {"answer": "e"}])
    assert w.close() == 2
    text = (tmp_path / "x.jsonl").read_text(encoding="utf-8")
    assert [json.loads(line)["answer"] for line in text.splitlines()] == [answer, "e"]
    assert "<mam> a" in text  # UTF-8 text stays readable: only the three breaks are escaped
