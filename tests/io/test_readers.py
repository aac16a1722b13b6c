import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persqa_ray import schema
from persqa_ray.io.filesystems import list_shards
from persqa_ray.io.readers import ReadOptions, read_shard
from persqa_ray.io.row_ids import positional_row_id


def opts(**kw):
    base = dict(image_column="image", id_column=None, paths_relative_to="input_dir", cwd="/driver/cwd",
                storage_options={})
    base.update(kw)
    return ReadOptions(**base)


def rows_of(shard, fmt, o=None):
    return [r for t in read_shard(str(shard), fmt, o or opts()) for r in t.to_pylist()]


def test_jsonl_rows_normalized(tmp_path):
    shard = tmp_path / "a.jsonl"
    shard.write_text("\n".join([
        json.dumps({"image": ["./test/example1.jpg"], "caption": "x"}),
        "",
        json.dumps({"image": "img/b.png"}),
        json.dumps({"image": ["s3://bucket/c.jpg", "/abs/d.jpg"]}),
    ]) + "\n")
    rows = rows_of(shard, "jsonl")
    assert len(rows) == 3  # the blank line is not a row
    assert rows[0]["image"] == [str(tmp_path / "test" / "example1.jpg")]
    assert rows[0]["caption"] == "x" and rows[0]["status"] == schema.OK
    assert rows[1]["image"] == [str(tmp_path / "img" / "b.png")]  # a bare string becomes a list
    assert rows[2]["image"] == ["s3://bucket/c.jpg", "/abs/d.jpg"]


def test_paths_relative_to_cwd(tmp_path):
    shard = tmp_path / "a.jsonl"
    shard.write_text(json.dumps({"image": "x.jpg"}) + "\n")
    rows = rows_of(shard, "jsonl", opts(paths_relative_to="cwd"))
    assert rows[0]["image"] == ["/driver/cwd/x.jpg"]


def test_parquet_rows_and_positional_ids(tmp_path):
    shard = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"image": ["same.jpg"], "n": i} for i in range(1200)]), shard)
    rows = rows_of(shard, "parquet")
    assert len(rows) == 1200 and [r["n"] for r in rows] == list(range(1200))
    ids = [r["row_id"] for r in rows]
    assert len(set(ids)) == 1200  # the same image in every row, yet no id collides
    assert ids[5] == positional_row_id(str(shard), 5)
    assert rows_of(shard, "parquet")[5]["row_id"] == ids[5]  # stable across reads


def test_id_column_used_when_set(tmp_path):
    shard = tmp_path / "a.jsonl"
    shard.write_text(json.dumps({"id": 42, "image": "a.jpg"}) + "\n" + json.dumps({"id": "k", "image": "b.jpg"}) + "\n")
    rows = rows_of(shard, "jsonl", opts(id_column="id"))
    assert [r["row_id"] for r in rows] == ["42", "k"]


def test_bad_records_become_error_rows(tmp_path):
    shard = tmp_path / "bad.jsonl"
    shard.write_text('{"image": "a.jpg"}\n{not json\n[1, 2]\n{"image": null}\n{"image": []}\n'
                     '{"image": 7}\n{"other": 1}\n')
    rows = rows_of(shard, "jsonl")
    assert [r["status"] for r in rows] == [schema.OK, schema.BAD_RECORD, schema.BAD_RECORD, schema.NO_IMAGE,
                                           schema.NO_IMAGE, schema.BAD_RECORD, schema.MISSING_COLUMN]
    assert "line 2" in rows[1]["error"] and "not valid JSON" in rows[1]["error"]
    assert all(r["error"] for r in rows[1:])
    assert len({r["row_id"] for r in rows}) == len(rows)


def test_clashing_input_columns_are_kept_renamed(tmp_path):
    shard = tmp_path / "a.jsonl"
    shard.write_text(json.dumps({"image": "a.jpg", "status": "draft", "answer": "old"}) + "\n")
    row = rows_of(shard, "jsonl")[0]
    assert row["status"] == schema.OK and row["input_status"] == "draft" and row["input_answer"] == "old"


def test_list_shards_dir_glob_list(tmp_path):
    (tmp_path / "d").mkdir()
    for n in ("a.jsonl", "b.parquet", "c.txt", "_meta.json"):
        (tmp_path / "d" / n).write_text("x" * len(n))
    found = list_shards(str(tmp_path / "d"))
    assert [os.path.basename(s.path) for s in found] == ["a.jsonl", "b.parquet"]
    assert [s.format for s in found] == ["jsonl", "parquet"]
    assert [s.size for s in found] == [7, 9]  # from the listing: they size the run's windows
    assert [s.size for s in list_shards(str(tmp_path / "d" / "*.jsonl"))] == [7]
    assert len(list_shards(str(tmp_path / "d" / "*.jsonl"))) == 1
    assert len(list_shards([str(tmp_path / "d" / "a.jsonl"), str(tmp_path / "d" / "b.parquet")])) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(str(tmp_path / "nope"))


def test_columns_that_appear_in_later_rows_are_kept(tmp_path):
    shard = tmp_path / "a.jsonl"
    records = [{"image": "a.jpg"}, {"image": "b.jpg", "caption": "late"}, {"image": "c.jpg", "n": 1},
               {"image": "d.jpg", "n": "two"}]
    shard.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = next(read_shard(str(shard), "jsonl", opts()))
    rows = table.to_pylist()
    assert [r["caption"] for r in rows] == [None, "late", None, None]
    assert [r["n"] for r in rows] == [None, None, "1", '"two"']  # mixed types: kept as JSON text


def test_overlong_jsonl_line_is_a_bad_record_and_never_held(tmp_path):
    """input.max_record_bytes: a 3 MB line becomes one bad_record row (its position counted, the
    rows around it intact); the reader never holds more than the limit of it."""
    shard = tmp_path / "a.jsonl"
    with open(shard, "w") as f:
        f.write(json.dumps({"image": "a.jpg", "n": 0}) + "\n")
        f.write(json.dumps({"image": "b.jpg", "blob": "x" * 3_000_000}) + "\n")
        f.write(json.dumps({"image": "c.jpg", "n": 2}) + "\n")
        f.write(json.dumps({"image": "d.jpg", "tail": "y" * 2_000_000}))  # no final newline
    rows = rows_of(shard, "jsonl", opts(max_record_bytes=1_000_000))
    assert [r["status"] for r in rows] == [schema.OK, schema.BAD_RECORD, schema.OK, schema.BAD_RECORD]
    assert "line 2" in rows[1]["error"] and "over input.max_record_bytes=1000000" in rows[1]["error"]
    assert rows[2]["n"] == 2 and rows[1]["row_id"] == positional_row_id(str(shard), 1)
    assert "blob" not in rows[1] and "line 4" in rows[3]["error"]


def test_relative_reference_in_an_s3_shard_resolves_before_the_root_check():
    """'..' in a reference is resolved where the row is read: what the decoder checks against its
    roots (and fetches) is s3://other-bucket/..., not a path that only looks like it is inside."""
    from persqa_ray.io.readers import normalize_row
    row = normalize_row({"image": ["../../other-bucket/secret.jpg", "img/ok.jpg"]}, "s3://inputs/in/a.jsonl", 0,
                        opts())
    assert row["image"] == ["s3://other-bucket/secret.jpg", "s3://inputs/in/img/ok.jpg"]


def test_an_input_column_keeps_one_type_in_every_block():
    """A column that holds a name in one row and a list in another (a concept column with a
    multi-concept row) must take the same type in every block, or Ray cannot merge the blocks and
    the whole job stops: nested values are kept as JSON text."""
    from persqa_ray.io.readers import rows_to_table
    one = rows_to_table([{"row_id": "a", "concept": "eileen", "n": 1}])
    other = rows_to_table([{"row_id": "b", "concept": ["eileen", "chelsea"], "n": 2}])
    assert one.schema.field("concept").type == other.schema.field("concept").type == pa.string()
    assert other.column("concept").to_pylist() == ['["eileen", "chelsea"]']
    assert pa.concat_tables([one, other]).num_rows == 2
