"""Export builders on hand-made rows: conversation shape, concept split, leaks, bad specs."""
import pytest

from persqa_ray.export import ExportError, parse_split, split_by_concept, to_jsonl, to_llava, to_sharegpt


def row(rid, k, concept, image_concept=None, qa_type="open", q="Q", a="A", images=("/d/x.jpg",)):
    return {"row_id": rid, "qa_index": k, "concept": concept, "image_concept": image_concept or concept,
            "tag": f"<{concept}>", "qa_type": qa_type, "question": f"{q}{k}", "answer": f"{a}{k}",
            "image": list(images), "label": None}


def test_llava_and_sharegpt_conversations():
    rows = [row("r1", 0, "bo"), row("r1", 1, "bo"), row("r2", 0, "sks", images=("/d/a.jpg", "/d/b.jpg"))]
    llava = to_llava(rows, image_root="/d")
    assert llava[0] == {"id": "r1", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nQ0"}, {"from": "gpt", "value": "A0"},
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}]}
    assert llava[1]["image"] == ["a.jpg", "b.jpg"] and llava[1]["conversations"][0]["value"] == "<image>\n<image>\nQ0"
    sg = to_sharegpt(rows)
    assert sg[1]["images"] == ["/d/a.jpg", "/d/b.jpg"] and sg[1]["messages"][0]["content"] == "<image><image>Q0"
    assert [m["role"] for m in sg[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [r["qa_index"] for r in to_jsonl(rows)] == [0, 1, 0]


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
