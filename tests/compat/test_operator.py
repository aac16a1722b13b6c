"""The operator is the pipeline's own core: same questions as the CLI, same answers at temperature 0;
and users' own serving/storage objects that follow the base classes work."""
import json

import pandas as pd
import pytest

import persqa_ray
from persqa_ray.compat import (
    DataFlowStorage,
    FileStorage,
    LLMServingABC,
    LocalModelVLMServing_vllm,
    PersQAGenerate,
    PersQAGenerator,
)
from tests.compat.test_dataflow_examples import make_workdir
from tests.e2e.helpers import run_cli, write_config


class ListStorage(DataFlowStorage):
    """A user's own storage: rows in memory, DataFrame in and out."""

    def __init__(self, rows):
        self.rows, self.written = rows, None

    def read(self, output_type="dataframe"):
        return pd.DataFrame(self.rows)

    def write(self, data):
        self.written = data
        return "memory"


class EchoServing(LLMServingABC):
    """A user's own serving (e.g. a remote API client): here it answers from the prompt text."""

    def __init__(self):
        self.calls = []

    def generate_from_input(self, user_inputs, system_prompt="", image_inputs=None):
        self.calls.append((list(user_inputs), [len(i) for i in image_inputs]))
        return ["<mam> is in the photo." if "Where" in p else "I cannot tell." for p in user_inputs]


def test_user_serving_and_storage_follow_the_protocols(tmp_path, monkeypatch):
    make_workdir(tmp_path)
    monkeypatch.chdir(tmp_path)
    rows = [{"image": ["./test/example1.jpg"], "k": i} for i in range(6)] + [{"image": None, "k": 6}]
    storage, serving = ListStorage(rows), EchoServing()
    assert PersQAGenerate(serving, max_retries=1).run(storage) == ["pers_qa"]  # DataFlow-MM: the output keys
    out = storage.written
    assert [r["k"] for r in out] == list(range(7))
    assert all(n == [1] * len(p) for p, n in serving.calls)  # one image per prompt, batched
    for r in out[:6]:
        assert r["status"] in ("ok", "invalid_output")
        assert (r["pers_qa"] is not None) == (r["status"] == "ok")
    assert any(r["status"] == "invalid_output" and "does not start with <mam>" in r["error"] for r in out)
    assert out[6]["status"] == "no_image" and out[6]["pers_qa"] is None


@pytest.mark.slow
def test_same_questions_and_greedy_answers_as_cli(tmp_path, tiny_model, monkeypatch):
    make_workdir(tmp_path)
    monkeypatch.chdir(tmp_path)
    serving = LocalModelVLMServing_vllm(hf_model_name_or_path=tiny_model, vllm_temperature=0.0,
                                        vllm_max_tokens=12, vllm_enforce_eager=True)
    storage = FileStorage(first_entry_file_name="data/example.jsonl", cache_path="./cache_local",
                          file_name_prefix="pers_qa", cache_type="jsonl")
    storage.step()
    try:
        assert PersQAGenerate(serving, seed=11).run(storage=storage) == ["pers_qa"]
    finally:
        serving.cleanup()
    op = [json.loads(line) for line in open("cache_local/pers_qa_step1.jsonl")]

    cfg = {"input": {"path": "data/example.jsonl", "paths_relative_to": "cwd"},
           "prompt": {"seed": 11},
           "engine": {"model": tiny_model, "num_gpus": 0, "num_cpus": 1, "temperature": 0.0, "max_tokens": 12,
                      "enforce_eager": True, "batch_size": 64,
                      "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
           "output": {"path": "cli_out"}}
    proc = run_cli(["run", str(write_config(tmp_path / "cli.yaml", cfg))], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = persqa_ray.read_output(str(tmp_path / "cli_out")).to_pylist()
    by_id = {r["id"]: r for r in cli}
    assert len(cli) == len(op) == 4
    for r in op:
        c = by_id[r["id"]]
        assert c["status"] == r["status"]
        assert c["pers_qa"] == r["pers_qa"]  # same question, same template, same greedy answer
    assert sum(r["status"] == "ok" for r in op) == 3


def test_output_key_defaults_desc_and_users_status_columns(tmp_path, monkeypatch):
    """Each class's output_key default as in its DataFlow-MM document (PersQAGenerate: 'pers_qa',
    PersQAGenerator: 'output'); get_desc(lang); the user's own status/error columns are kept and
    ours get the output key as a prefix."""
    make_workdir(tmp_path)
    monkeypatch.chdir(tmp_path)
    rows = [{"image": ["./test/example1.jpg"], "status": "reviewed", "error": "none seen"},
            {"image": ["./test/missing.jpg"], "status": "new", "error": None}]
    storage = ListStorage(rows)
    assert PersQAGenerator(EchoServing(), max_retries=0).run(storage) == ["output"]
    out = storage.written
    assert [r["status"] for r in out] == ["reviewed", "new"] and out[0]["error"] == "none seen"  # kept
    assert out[0]["output_status"] in ("ok", "invalid_output") and out[1]["output_status"] == "missing_image"
    assert "missing.jpg" in out[1]["output_error"] and out[1]["output"] is None
    storage = ListStorage([{"image": ["./test/example1.jpg"]}])
    assert PersQAGenerator(EchoServing()).run(storage, input_modal_key="image", output_key="pers_qa") == ["pers_qa"]
    assert set(storage.written[0]) == {"image", "pers_qa", "status", "error"}  # no prefix without a clash
    storage = ListStorage([{"image": ["./test/example1.jpg"]}])
    PersQAGenerate(EchoServing()).run(storage)
    assert "pers_qa" in storage.written[0] and "output" not in storage.written[0]
    for cls in (PersQAGenerate, PersQAGenerator):
        assert "output_key" in cls.get_desc("en") and "<mam>" in cls.get_desc("en")
        assert "输出" in cls.get_desc() and cls.get_desc("zh") == cls.get_desc()  # DataFlow's default: zh
    with pytest.raises(ValueError, match="output_key"):
        PersQAGenerate(EchoServing()).run(ListStorage(rows), output_key="")
