import json

import pandas as pd
import pytest

from persqa_ray.compat import DataFlowStorage, FileStorage


@pytest.mark.parametrize("cache_type", ["jsonl", "json", "parquet", "csv"])
def test_steps_and_round_trip(tmp_path, cache_type):
    first = tmp_path / "data" / "example.jsonl"
    first.parent.mkdir()
    rows = [{"image": ["./test/a.jpg"], "n": 1}, {"image": "./test/b.jpg", "n": 2}]
    first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = FileStorage(first_entry_file_name=str(first), cache_path=str(tmp_path / "cache"),
                    file_name_prefix="pers_qa", cache_type=cache_type)
    s.step()
    df = s.read("dataframe")
    assert isinstance(df, pd.DataFrame) and list(df["n"]) == [1, 2]
    assert s.read("dict") == rows
    out = [dict(r, pers_qa=f"Question: q{i} Answer: <mam> a{i}", extra=None) for i, r in enumerate(rows)]
    path = s.write(pd.DataFrame(out))
    assert path == str(tmp_path / "cache" / f"pers_qa_step1.{cache_type}")
    s.step()
    back = s.read("dict")
    if cache_type == "parquet":  # a column mixing list and string is kept as JSON text there
        assert [json.loads(r["image"]) for r in back] == [["./test/a.jpg"], "./test/b.jpg"]
    else:
        assert [r["image"] for r in back] == [["./test/a.jpg"], "./test/b.jpg"]
    assert [r["pers_qa"] for r in back] == ["Question: q0 Answer: <mam> a0", "Question: q1 Answer: <mam> a1"]
    assert s.write(back).endswith(f"pers_qa_step2.{cache_type}")


def test_jsonl_never_writes_nan(tmp_path):
    s = FileStorage(first_entry_file_name="x.jsonl", cache_path=str(tmp_path), file_name_prefix="p").step()
    path = s.write(pd.DataFrame([{"a": 1.0, "b": "x"}, {"a": float("nan")}]))
    lines = [json.loads(line) for line in open(path)]  # strict JSON parser: NaN would fail
    assert lines[1]["a"] is None


def test_jsonl_lines_survive_any_line_splitter(tmp_path):
    s = FileStorage(first_entry_file_name="x.jsonl", cache_path=str(tmp_path), file_name_prefix="p").step()
    answer = "Question: q Answer: <mam> a\x85b\u2028c"
    path = s.write(pd.DataFrame([{"pers_qa": answer}, {"pers_qa": "x"}]))
    with open(path, encoding="utf-8") as f:
        assert [json.loads(line)["pers_qa"] for line in f.read().splitlines()] == [answer, "x"]


def test_bad_cache_type_and_output_type(tmp_path):
    with pytest.raises(ValueError, match="cache_type"):
        FileStorage("x.jsonl", cache_type="xlsx")
    s = FileStorage("x.jsonl")
    assert isinstance(s, DataFlowStorage)


def test_dataflow_defaults_and_no_read_or_write_before_step(tmp_path, monkeypatch):
    """DataFlow-MM's FileStorage: cache_path './cache', prefix 'dataflow_cache', cache_type 'jsonl';
    read() before step() raises with its message; a write before step() would (in DataFlow-MM)
    write step 0, the input file itself: refused here, and the input is untouched."""
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "in.jsonl"
    first.write_text('{"image": "a.jpg"}\n')
    s = FileStorage(str(first))
    assert (s.cache_path, s.file_name_prefix, s.cache_type) == ("./cache", "dataflow_cache", "jsonl")
    with pytest.raises(ValueError, match=r"must call storage.step\(\) before reading"):
        s.read()
    with pytest.raises(ValueError, match=r"storage.step\(\)"):
        s.write([{"image": "b.jpg"}])
    assert first.read_text() == '{"image": "a.jpg"}\n' and not (tmp_path / "cache").exists()
    assert s.step().read("dict") == [{"image": "a.jpg"}]
    assert s.write([{"image": "a.jpg", "x": 1}]) == "./cache/dataflow_cache_step1.jsonl"
    assert s.step().read("dict") == [{"image": "a.jpg", "x": 1}]
    assert s.reset().operator_step == -1
    # The English documentation passes media_key / media_type: accepted (they change nothing).
    FileStorage(str(first), media_key="image", media_type="image")
    with pytest.raises(ValueError, match="pickle"):
        FileStorage(str(first), cache_type="pickle")
