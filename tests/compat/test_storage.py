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
    assert s.media_key == "image" and s.media_type == "image"  # defaults when not given
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
    s = FileStorage(first_entry_file_name="x.jsonl", cache_path=str(tmp_path), file_name_prefix="p")
    path = s.write(pd.DataFrame([{"a": 1.0, "b": "x"}, {"a": float("nan")}]))
    lines = [json.loads(line) for line in open(path)]  # strict JSON parser: NaN would fail
    assert lines[1]["a"] is None


def test_bad_cache_type_and_output_type(tmp_path):
    with pytest.raises(ValueError, match="cache_type"):
        FileStorage("x.jsonl", cache_type="xlsx")
    s = FileStorage("x.jsonl")
    assert isinstance(s, DataFlowStorage)
