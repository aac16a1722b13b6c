"""engine.kind=openai against a real `vllm serve` of the tiny model on 127.0.0.1 (started here,
stopped by pid): structured output through the server, an API key that never leaks, and the
server dying mid-run (rows retried, then engine_error; the job still accounts for every row)."""
import json
import os
import signal
from pathlib import Path

import pytest

import persqa_ray
from tests.conftest import API_KEY, demo_config, free_port
from tests.e2e.helpers import cli_running, run_cli, summary_of, wait_for_commits, write_config

pytestmark = pytest.mark.slow


def openai_config(data_dir, out, server, prompt=None, **engine):
    e = {"kind": "openai", "model": "tiny", "base_url": server["base_url"], "api_key_env": "PERSQA_TEST_API_KEY",
         "num_cpus": 0.5, "max_concurrency": 8, "request_timeout_s": 30, "max_attempts": 3, "backoff_s": 0.2}
    e.update(engine)
    cfg = demo_config(data_dir, out, "tiny")
    cfg["engine"] = e  # a whole engine section of its own kind, not merged over the demo's vLLM one
    cfg["prompt"].update(prompt or {})
    return cfg


def test_pipeline_through_vllm_serve(vllm_server, demo_data, tmp_path):
    data_dir, manifest = demo_data
    # Subject detection too: the server's structured output ("choice") must give one of the labels.
    cfg = write_config(tmp_path / "o.yaml", openai_config(data_dir, tmp_path / "out", vllm_server,
                                                          prompt={"detect_subject_type": True}))
    os.environ["PERSQA_TEST_API_KEY"] = API_KEY
    try:
        proc = run_cli(["run", str(cfg)], cwd=tmp_path)
    finally:
        del os.environ["PERSQA_TEST_API_KEY"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(tmp_path / "out")
    assert s["rows_in"] == manifest["rows"] == s["rows_ok"] + s["rows_error"]
    assert s["errors_by_status"] == {"bad_image": 1, "missing_image": 1}
    rows = persqa_ray.read_output(str(tmp_path / "out")).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == manifest["rows"] - 2
    assert all(r["answer"].startswith("<mam>") for r in ok)  # the server's structured output
    assert all(r["subject_type_source"] == "detected" and r["subject_type"] in ("person", "animal", "object")
               for r in ok)
    assert all(r["template_id"].rsplit("-", 1)[0] in ("en-act", "en-scn", f"en-app-{r['subject_type'][0]}")
               for r in ok)
    assert all(r["num_input_tokens"] > 0 and r["num_output_tokens"] > 0 and r["latency_s"] > 0 for r in ok)
    two = [r for r in ok if r["source"] == "two images"][0]
    one = [r for r in ok if r["source"] == "skimage"][0]
    assert two["num_input_tokens"] > one["num_input_tokens"]  # both images reached the server
    texts = [proc.stdout, proc.stderr, (tmp_path / "out" / "_summary.json").read_text(), json.dumps(rows)]
    texts += [p.read_bytes().decode(errors="replace") for p in Path("/tmp/ray").glob("session_*/logs/**/*")
              if p.is_file()]
    assert not any(API_KEY in t for t in texts)


def test_wrong_key_is_an_engine_error_not_a_crash(vllm_server, tmp_path):
    import make_demo_data
    manifest = make_demo_data.make(tmp_path / "d", rows=2)
    cfg = write_config(tmp_path / "w.yaml", openai_config(tmp_path / "d", tmp_path / "out", vllm_server))
    proc = run_cli(["run", str(cfg)], cwd=tmp_path)  # PERSQA_TEST_API_KEY unset: the server says 401
    # Every row failed: written, but not a success (run.max_error_fraction).
    assert proc.returncode == 3 and "run failed" in proc.stderr, proc.stderr[-3000:]
    rows = persqa_ray.read_output(str(tmp_path / "out")).to_pylist()
    errs = [r for r in rows if r["status"] == "engine_error"]
    assert len(errs) == manifest["rows"] - 2
    assert all("401" in r["error"] and "1 attempt" in r["error"] for r in errs)  # not retried


def test_retry_errors_after_a_dead_server_comes_back(vllm_server, tmp_path):
    """A nightly run against a server that is down commits every row as engine_error and fails
    (exit 3); once the server is back (at another address), --retry-errors regenerates exactly
    those rows, and their new rows replace the error rows in one commit."""
    import make_demo_data
    manifest = make_demo_data.make(tmp_path / "d", rows=8)
    out = tmp_path / "out"
    cfg = openai_config(tmp_path / "d", out, vllm_server, max_attempts=2, backoff_s=0.05)
    cfg["engine"]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"  # nobody listens there
    cfg_path = write_config(tmp_path / "r.yaml", cfg)
    env = {"PERSQA_TEST_API_KEY": API_KEY}
    with cli_running(["run", str(cfg_path), "--quiet"], tmp_path, env) as proc:
        stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 3 and "engine_error" in stderr, stderr[-3000:]
    dead = summary_of(out)
    assert dead["errors_by_status"]["engine_error"] == manifest["rows"] - 2 and dead["failed"]
    # A plain rerun does not redo them (they are committed), and still says the output failed.
    with cli_running(["run", str(cfg_path), "--quiet"], tmp_path, env) as proc:
        proc.communicate(timeout=400)
    assert proc.returncode == 3 and summary_of(out)["rows_resumed"] == manifest["rows"]
    # The server is back at another address: not part of the run identity, so the retry proceeds.
    with cli_running(["run", str(cfg_path), "--quiet", "--retry-errors",
                      "--set", f"engine.base_url={vllm_server['base_url']}"], tmp_path, env) as proc:
        stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    s = summary_of(out)
    assert s["rows_retried"] == manifest["rows"] - 2 and s["errors_by_status"] == {"bad_image": 1, "missing_image": 1}
    assert s["rows_in"] == s["rows_ok"] + s["rows_error"] == manifest["rows"] and s["duplicates"] == 0
    rows = persqa_ray.read_output(str(out)).to_pylist()
    assert len(rows) == manifest["rows"] and len({r["row_id"] for r in rows}) == manifest["rows"]
    assert not [r for r in rows if r["status"] == "engine_error"]  # never both the old and the new


def test_server_stopped_mid_run(vllm_server, tmp_path):
    import make_demo_data
    manifest = make_demo_data.make(tmp_path / "d", rows=60)
    out = tmp_path / "out"
    cfg = openai_config(tmp_path / "d", out, vllm_server, batch_size=2, max_tokens=96)
    cfg["input"]["block_rows"] = 2
    cfg_path = write_config(tmp_path / "s.yaml", cfg)
    with cli_running(["run", str(cfg_path), "--quiet"], tmp_path, {"PERSQA_TEST_API_KEY": API_KEY}) as proc:
        wait_for_commits(proc, out, 3)
        server = vllm_server["proc"]
        os.killpg(server.pid, signal.SIGKILL)  # the server goes away for good
        server.wait()
        stdout, stderr = proc.communicate(timeout=400)
    s = summary_of(out)
    # Most rows failing makes the run fail (exit 3) after writing everything; a few do not.
    assert proc.returncode == (3 if s["engine_error_fraction"] > 0.5 else 0), stderr[-3000:]
    assert s["rows_in"] == manifest["rows"] == s["rows_ok"] + s["rows_error"] and s["duplicates"] == 0
    assert s["rows_ok"] >= 3 and s["errors_by_status"].get("engine_error", 0) > 0
    rows = persqa_ray.read_output(str(out)).to_pylist()
    errs = [r for r in rows if r["status"] == "engine_error"]
    assert all("APIConnectionError" in r["error"] and "3 attempt" in r["error"] for r in errs)  # retried first
