"""input.concepts_table: a registry as data; reference images resolved against the table and
read only under the input's roots."""
import json

import pytest

from persqa_ray.config import ConfigError
from persqa_ray.io.concept_rows import concept_records, position_of
from persqa_ray.personalization.concept_table import ConceptTableError, load_concepts_table
from persqa_ray.pipeline import plan


def write_table(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_table_of_concepts_with_relative_reference_images(tmp_path):
    t = write_table(tmp_path / "c.jsonl", [
        {"concept": "chelsea", "class_phrase": "the cat", "subject_type": "animal", "reference_images": ["r/1.jpg"]},
        {"concept": "my dog", "tag": "rex", "reference_images": "r/2.jpg", "info": "<rex> is a dog."}])
    a, b = load_concepts_table(str(t))
    assert (a.name, a.tag, a.class_phrase, a.subject_type) == ("chelsea", "<chelsea>", "the cat", "animal")
    assert a.reference_images == (str(tmp_path / "r" / "1.jpg"),)
    assert (b.tag, b.reference_images, b.info) == ("<rex>", (str(tmp_path / "r" / "2.jpg"),), "<rex> is a dog.")


@pytest.mark.parametrize("rows, message", [
    ([{"tag": "x"}], "no 'concept' name"),
    ([{"concept": "two words"}], "needs a tag"),
    ([{"concept": "a", "subject_type": "plant"}], "subject_type 'plant'"),
    ([{"concept": "a", "tag": "t"}, {"concept": "b", "tag": "t"}], "already the tag of concept 'a'"),
])
def test_bad_tables_are_refused_by_row(tmp_path, rows, message):
    with pytest.raises(ConceptTableError, match=message):
        load_concepts_table(str(write_table(tmp_path / "c.jsonl", rows)))


def test_reference_images_outside_the_roots_are_refused_before_work(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.jsonl").write_text('{"image": "a.jpg", "who": "chelsea"}\n')
    cfg = {"input": {"path": str(tmp_path / "in"), "concept_column": "who"}, "engine": {"kind": "standin"},
           "output": {"path": str(tmp_path / "out")},
           "prompt": {"reference_images_in_prompt": True, "tag_vocab_check": "off",
                      "concepts": {"chelsea": {"reference_images": [str(tmp_path / "elsewhere" / "c.jpg")]}}}}
    with pytest.raises(ConfigError, match=r"concept 'chelsea': reference image .*elsewhere/c.jpg is outside"):
        plan(cfg)
    cfg["input"]["allowed_roots"] = [str(tmp_path)]
    assert plan(cfg).personalization.registry.registered[0].reference_images == (str(tmp_path / "elsewhere" / "c.jpg"),)
    # the table's own directory is a root by default: its references need no allowed_roots
    (tmp_path / "t").mkdir()
    write_table(tmp_path / "t" / "c.jsonl", [{"concept": "chelsea", "reference_images": ["c.jpg"]}])
    cfg["input"].pop("allowed_roots")
    cfg["prompt"].pop("concepts")
    cfg["input"]["concepts_table"] = str(tmp_path / "t" / "c.jsonl")
    assert plan(cfg).decode.allowed_roots[-1] == str(tmp_path / "t")
    cfg["input"]["concepts_table"] = str(tmp_path / "t" / "missing.jsonl")
    with pytest.raises(ConfigError, match="input.concepts_table: .*does not exist"):
        plan(cfg)


def test_concept_rows_keep_their_positions_when_concepts_are_added():
    def positions(concepts):
        return {r["_pq_text_row"]: r["_pq_position"] for r in concept_records(concepts, lambda p: False)}
    before = positions([("b", ("x",)), ("a", ("y",))])
    after = positions([("a", ("y",)), ("c", ("z",)), ("b", ("x",))])
    assert before == {k: after[k] for k in before} and after["c"] == position_of("c")
    done = {position_of("a")}
    rows = list(concept_records([("a", ("y",)), ("b", ("x",))], lambda p: p in done))
    assert rows[0] is None and rows[1]["image"] == ["x"]   # a committed concept row is skipped
