"""Actors killed mid-run (by pid): Ray restarts them, their blocks are retried, every row is
accounted for exactly once, and no vLLM engine process is left behind."""
import os
import signal
import time

import pytest

import persqa_ray
from tests.conftest import demo_config
from tests.e2e.helpers import cli_running, engine_processes, pids_of, summary_of, wait_for_commits, write_config

pytestmark = pytest.mark.slow


def test_killed_decode_and_generate_actors(tmp_path, tiny_model):
    import make_demo_data
    data = tmp_path / "data"
    manifest = make_demo_data.make(data, rows=150)
    out = tmp_path / "out"
    cfg = demo_config(data, out, tiny_model, input={"block_rows": 2}, engine={"batch_size": 2, "max_tokens": 48},
                      image={"batch_size": 1, "max_pixels": 1003520})
    cfg_path = write_config(tmp_path / "run.yaml", cfg)
    killed, replaced = [], []

    def wait_for(cond, what, timeout=300):
        deadline = time.time() + timeout
        while not cond():
            assert proc.poll() is None, f"run ended while waiting for {what}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def kill_and_see_replacement(marker):
        wait_for(lambda: pids_of(marker), marker)
        victim = pids_of(marker)[0]
        os.kill(victim, signal.SIGKILL)
        killed.append(marker)
        # Ray restarts the actor because its stage still has work: proof the kill was mid-work.
        wait_for(lambda: [p for p in pids_of(marker) if p != victim], f"a restarted {marker}", 120)
        replaced.append(marker)

    with cli_running(["run", str(cfg_path), "--quiet"], tmp_path) as proc:
        kill_and_see_replacement("MapBatches(DecodeStage)")  # while it decodes, before any answer
        wait_for_commits(proc, out, 2)
        kill_and_see_replacement("MapBatches(AsyncGenerateStage)")  # with its vLLM engine, mid-generation
        stdout, stderr = proc.communicate(timeout=400)
    assert killed == replaced == ["MapBatches(DecodeStage)", "MapBatches(AsyncGenerateStage)"]
    assert proc.returncode == 0, stderr[-4000:]
    s = summary_of(out)
    assert s["rows_in"] == manifest["rows"] == s["rows_ok"] + s["rows_error"]
    assert s["duplicates"] == 0 and s["errors_by_status"] == {"bad_image": 1, "missing_image": 1}
    rows = persqa_ray.read_output(str(out), ["row_id", "qa_index"]).to_pylist()
    assert len({(r["row_id"], r["qa_index"]) for r in rows}) == len(rows) == manifest["rows"]
    deadline = time.time() + 20
    while engine_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert engine_processes() == []


def test_killed_engine_process_is_recreated(tmp_path, tiny_model):
    """Kill the vLLM engine process inside the engine actor: the actor notices, builds a new engine,
    retries the batch; the run completes and no engine process is left."""
    import make_demo_data
    data = tmp_path / "data"
    manifest = make_demo_data.make(data, rows=60)
    out = tmp_path / "out"
    cfg = demo_config(data, out, tiny_model, input={"block_rows": 2}, engine={"batch_size": 2, "max_tokens": 96},
                      image={"batch_size": 2})
    with cli_running(["run", str(write_config(tmp_path / "r.yaml", cfg)), "--quiet"], tmp_path) as proc:
        wait_for_commits(proc, out, 2)
        engines = pids_of("VLLM::EngineCore")
        assert len(engines) == 1
        os.kill(engines[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-4000:]
    s = summary_of(out)
    assert s["engine_restarts"] >= 1
    assert s["rows_in"] == manifest["rows"] == s["rows_ok"] + s["rows_error"] and s["duplicates"] == 0
    assert s["errors_by_status"] == {"bad_image": 1, "missing_image": 1}  # no row lost to the dead engine
    deadline = time.time() + 20
    while engine_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert engine_processes() == []
