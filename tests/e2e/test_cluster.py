"""Where users run it: a real multi-node Ray cluster on loopback (`ray start` processes), `ray job
submit`, a notebook attached with `ray.init(address=...)`, and S3 (moto_server) for inputs,
images and outputs, with custom resources placing decode and generate on different nodes."""
import json
import os
import subprocess
import sys
import time
import uuid

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from tests.conftest import REPO, demo_config
from tests.e2e.cluster import RayCluster, S3Server
from tests.e2e.helpers import run_cli, summary_of, write_config

pytestmark = pytest.mark.slow
BUCKET = "persqa-test"


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    server.make_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3):
    env = dict(os.environ, **s3.env)
    c = RayCluster(env, head_cpus=4, head_resources={"engine_node": 1})
    try:
        c.add_node(2, {"decode_node": 1})   # a second node: decode actors go here
        yield c
    finally:
        c.stop()
    assert c.leftovers() == []  # every node, worker and engine process is gone


def _wait_job(cluster, sid: str, timeout: float = 480) -> str:
    deadline = time.time() + timeout
    status = ""
    while time.time() < deadline:
        r = cluster.ray_cli("job", "status", "--address", cluster.dashboard, sid)
        status = (r.stdout + r.stderr).lower()   # "Job 'x' succeeded" / "... failed" / "... stopped"
        if any(f"' {s}" in status for s in ("succeeded", "failed", "stopped")):
            return status
        time.sleep(3)
    cluster.ray_cli("job", "stop", "--address", cluster.dashboard, sid)
    raise AssertionError(f"job {sid} not finished after {timeout}s: {status}")


def test_ray_job_submit_runs_the_demo_job(cluster, demo_data, tiny_model, tmp_path):
    data_dir, manifest = demo_data
    out = tmp_path / "out"
    sid = f"persqa-{uuid.uuid4().hex[:8]}"
    # The README's recipe, with paths pointed at this machine's test data (on a real cluster they
    # would be s3:// URLs or shared storage, as configs/cluster.yaml has them).
    r = cluster.ray_cli(
        "job", "submit", "--address", cluster.dashboard, "--submission-id", sid, "--no-wait",
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"env_vars": {"HF_HOME": str(tmp_path / "hf")}}),
        "--", "python", "-m", "persqa_ray", "run", "configs/demo.yaml", "--set", f"input.path={data_dir}",
        "--set", f"input.concepts_table={data_dir}/_concepts/concepts.jsonl",
        "--set", f"engine.model={tiny_model}", "--set", f"output.path={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    status = _wait_job(cluster, sid)
    logs = cluster.ray_cli("job", "logs", "--address", cluster.dashboard, sid).stdout
    assert f"'{sid}' succeeded" in status, logs[-4000:]
    assert "rows_in == rows_ok + rows_error: True" in logs
    s = summary_of(out)
    # the demo config as shipped: the input rows plus one row per concept asked text-only questions
    assert s["rows_in"] == manifest["rows"] + s["text_qa_concepts"] == s["rows_ok"] + s["rows_error"]
    assert s["duplicates"] == 0 and s["text_qa_concepts"] == 2
    assert s["recognition_labels"]["yes"] == s["recognition_labels"]["no"] > 0
    assert {"open", "recognition", "text"} <= set(s["qa_rows_by_type"])


NOTEBOOK = r"""
import json, sys, ray, persqa_ray
ray.init(address=sys.argv[1])
cfg = persqa_ray.load_config(sys.argv[2])
ds = persqa_ray.build_dataset(cfg).materialize()   # runs once on the cluster
rows = ds.take(3)
ds.write_parquet(sys.argv[3])
print(json.dumps({"taken": [[r["row_id"], r["status"], r["tag"]] for r in rows], "count": ds.count(),
                  "nodes": len(ray.nodes())}))
"""


def test_notebook_api_on_a_running_cluster(cluster, demo_data, tiny_model, tmp_path):
    data_dir, manifest = demo_data
    cfg = write_config(tmp_path / "nb.yaml", demo_config(data_dir, tmp_path / "unused", tiny_model))
    script = tmp_path / "nb.py"
    script.write_text(NOTEBOOK)
    proc = subprocess.run([sys.executable, str(script), cluster.address, str(cfg), str(tmp_path / "written")],
                          env=cluster.env, capture_output=True, text=True, timeout=480, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 2 and result["count"] == manifest["rows"]
    assert len(result["taken"]) == 3 and all(tag == "<mam>" for _, status, tag in result["taken"] if status == "ok")
    written = pads.dataset(str(tmp_path / "written"), format="parquet").to_table()
    assert written.num_rows == manifest["rows"]


def _upload_demo(s3, data_dir) -> str:
    """Shards and images into the bucket, plus a shard whose rows name images by s3:// URL."""
    fs = s3.fs()
    prefix = f"{BUCKET}/in"
    for p in data_dir.rglob("*"):
        if p.is_file():
            fs.put(str(p), f"{prefix}/{p.relative_to(data_dir)}")
    rows = [{"image": f"s3://{prefix}/images/horse.jpg", "concept": "bucephalus", "subject": "animal"},
            {"image": [f"s3://{prefix}/images/rocket.jpg"], "concept": "saturnv", "subject": None},
            {"image": f"s3://{prefix}/nowhere/missing.jpg", "concept": "ghost", "subject": "object"}]
    fs.pipe(f"{prefix}/shard-002.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return f"s3://{prefix}/"


def test_two_nodes_s3_in_and_out_with_custom_resources(cluster, s3, demo_data, tiny_model, tmp_path):
    data_dir, manifest = demo_data
    src = _upload_demo(s3, data_dir)
    cfg = demo_config(data_dir, tmp_path / "unused", tiny_model, personalized=True)
    cfg["input"].update(path=src, storage_options=s3.storage_options)
    cfg["output"].update(path=f"s3://{BUCKET}/out", storage_options=s3.storage_options,
                         partition_by=["status", "qa_type"])
    cfg["image"]["resources"] = {"decode_node": 0.5}      # only the second node has it
    cfg["engine"]["resources"] = {"engine_node": 0.5}     # only the head has it
    cfg["ray"] = {"address": cluster.address}
    path = write_config(tmp_path / "s3.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "persqa_ray", "run", str(path), "--json", "--quiet"],
                          env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # --quiet: the summary is all of stdout; Ray Data's progress and INFO lines are gone
    assert proc.stdout.startswith("{") and "Starting execution" not in proc.stderr + proc.stdout
    lines = proc.stdout.splitlines()
    s = json.loads("\n".join(lines[len(lines) - 1 - lines[::-1].index("{"):]))  # the summary: the last JSON object
    rows_in = manifest["rows"] + 3 + 2   # 3 rows naming s3:// images, 2 concept rows of text-only QA
    assert s["rows_in"] == rows_in == s["rows_ok"] + s["rows_error"] and s["duplicates"] == 0
    assert s["errors_by_status"]["bad_image"] == 1 and s["errors_by_status"]["missing_image"] == 2
    assert set(s["errors_by_status"]) <= {"bad_image", "missing_image", "invalid_output"}
    # decode ran only on the second node, generate only on the head: no stage needed the driver's files
    assert len(s["nodes"]["decode"]) == 1 and len(s["nodes"]["generate"]) == 1
    assert s["nodes"]["decode"] != s["nodes"]["generate"]
    # the output is in the bucket, partitioned, and pyarrow reads it back
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(s3.fs()))
    table = pads.dataset(f"{BUCKET}/out", filesystem=fs, format="parquet", partitioning="hive",
                         exclude_invalid_files=True).to_table()
    assert len(set(table.column("row_id").to_pylist())) == rows_in
    assert s3.fs().exists(f"{BUCKET}/out/_summary.json")
    assert {p.split("/")[-1] for p in s3.fs().ls(f"{BUCKET}/out/status=ok")} >= \
        {"qa_type=open", "qa_type=recognition", "qa_type=text"}
    url_rows = [r for r in table.to_pylist() if r["image"][0].startswith(f"s3://{BUCKET}/in/images/horse")]
    assert url_rows and all(r["status"] == "ok" for r in url_rows)   # fetched by the decode stage
    # the export works on an s3:// output and writes to s3://
    opts = json.dumps(s3.storage_options)
    ex = run_cli(["export", f"s3://{BUCKET}/out", "--format", "jsonl", "--out", f"s3://{BUCKET}/export/qa.jsonl",
                  "--storage-options", opts], cwd=tmp_path, timeout=120, env=s3.env)
    assert ex.returncode == 0, ex.stderr
    lines = s3.fs().cat(f"{BUCKET}/export/qa.jsonl").decode("utf-8").splitlines()
    assert len(lines) == s["qa_rows_ok"]


def test_unreachable_s3_input_is_a_config_error(s3, tiny_model, tmp_path):
    cfg = demo_config(tmp_path, tmp_path / "out", tiny_model)
    cfg["input"].update(path=f"s3://{BUCKET}/no-such-prefix/", storage_options=s3.storage_options)
    proc = run_cli(["validate", str(write_config(tmp_path / "c.yaml", cfg))], cwd=tmp_path, timeout=120, env=s3.env)
    assert proc.returncode == 2 and "input.path" in proc.stderr
