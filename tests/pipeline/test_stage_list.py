"""One stage list, two executors: the DataFlow face's in-process run and a Ray Data run of the
same list give the same rows (stand-in engine: the wiring is under test, not the model)."""
import json

import pyarrow as pa
import ray

from persqa_ray import schema
from persqa_ray.io.readers import read_shard
from persqa_ray.pipeline import build_dataset, plan
from persqa_ray.pipeline.executors import in_process
from persqa_ray.pipeline.stage_list import stage_list
from tests.conftest import demo_config

PERSONALIZED = {"prompt": {"tag": "mam", "seed": 3, "questions_per_image": 2, "recognition": True,
                           "default_subject_type": "object"}}


def standin_config(data_dir, tmp_path, tiny_model):
    cfg = demo_config(data_dir, tmp_path / "out", tiny_model, **PERSONALIZED)
    cfg["engine"] = {"kind": "standin", "model": "standin", "max_tokens": 4, "num_cpus": 0.5}
    return cfg


def test_the_list_is_in_order_and_its_columns_chain(demo_data, tmp_path, tiny_model):
    p = plan(standin_config(demo_data[0], tmp_path, tiny_model))
    stages = stage_list(p)
    assert [s.name for s in stages] == ["read", "items", "blocks", "decode", "generate"]
    assert [s.name for s in stages if s.in_process and s.udf is not None] == ["items", "decode", "generate"]
    generate = stages[-1].map_batches_kwargs()
    assert generate["compute"].max_tasks_in_flight_per_actor == p.config.engine.max_batches_in_flight


def test_in_process_and_ray_data_give_the_same_rows(demo_data, tmp_path, tiny_model):
    p = plan(standin_config(demo_data[0], tmp_path, tiny_model))
    table = pa.concat_tables([t for s in p.shards for t in read_shard(s.path, s.format, p.read)],
                             promote_options="permissive")
    local = in_process(stage_list(p), table).drop_columns(list(schema.WRITER_COLUMNS))
    try:
        on_ray = pa.Table.from_pylist(build_dataset(p.config).take_all())
    finally:
        ray.shutdown()  # the Ray this test started in the test process
    key = ("row_id", "qa_index", "qa_type", "question", "template_id", "status", "error", "answer")

    def rows(t):
        return sorted(json.dumps([r[k] for k in key]) for r in t.select(list(key)).to_pylist())
    assert local.num_rows == on_ray.num_rows == 21 * 3 + 2   # 21 ok rows x (2 open + 1 recognition) + 2 errors
    assert rows(local) == rows(on_ray)
