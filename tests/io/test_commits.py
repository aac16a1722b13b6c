"""The commit layer on real files: units and records, trusted only with their files; per-shard
resume state; the summary fold; partition types; the output guard; the lease; input listing."""
import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from persqa_ray import schema
from persqa_ray.config import ConfigError
from persqa_ray.io.commits import WriteOptions, merge_ranges, shard_dir, to_ranges, write_committed
from persqa_ray.io.dataset import read_output
from persqa_ray.io.filesystems import filesystem, list_shards
from persqa_ray.io.lease import Lease, LeaseHeld
from persqa_ray.io.outputs import check_output_location, clear_output, write_run_file
from persqa_ray.io.resume import ResumeOptions, load_shard_state
from persqa_ray.io.summary import fold_records


def block(shard: str, positions, status="ok", concept="001", replaces=None) -> pa.Table:
    n = len(positions)
    cols = {f.name: pa.nulls(n, f.type) for f in schema.OUTPUT_FIELDS}
    cols["row_id"] = pa.array([f"{shard}-{p}" for p in positions])
    cols["qa_index"] = pa.array([0] * n, pa.int32())
    cols["status"] = pa.array([status] * n)
    cols["concept"] = pa.array([concept] * n)
    cols["question"] = pa.array(["q?"] * n)
    cols["qa_type"] = pa.array(["open"] * n)
    cols["num_input_tokens"] = pa.array([3] * n, pa.int32())
    cols["num_output_tokens"] = pa.array([5] * n, pa.int32())
    cols[schema.SOURCE] = pa.array([shard] * n)
    cols[schema.POSITION] = pa.array(list(positions), pa.int64())
    cols[schema.REPLACES] = pa.array([replaces] * n, pa.string())
    return pa.table(cols)


def opts(out, partition_by=("status", "concept")):
    return WriteOptions(path=str(out), storage_options={}, partition_by=tuple(partition_by))


def ours(out):
    out.mkdir(parents=True, exist_ok=True)
    write_run_file(filesystem(str(out))[0], str(out), {"prompt": {}})


def test_ranges():
    assert to_ranges([5, 1, 2, 3, 7, 6]) == [[1, 4], [5, 8]]
    assert merge_ranges([[5, 8], [0, 2], [2, 3], [7, 9]]) == [[0, 3], [5, 9]]


def test_units_per_shard_records_and_fold(tmp_path):
    out = tmp_path / "out"
    ours(out)
    batch = pa.concat_tables([block("/d/a.jsonl", range(0, 4)), block("/d/b.jsonl", range(0, 2), status="bad_image")])
    assert write_committed(batch, opts(out)).column("rows").to_pylist() == [6]
    # Ray retries a write that had committed: nothing is written twice.
    assert write_committed(batch, opts(out)).column("rows").to_pylist() == [0]
    rec_a = [json.loads(p.read_text()) for p in (out / "_commits").glob("*/*.json")
             if json.loads(p.read_text())["shard"] == "/d/a.jsonl"][0]
    assert rec_a["ranges"] == [[0, 4]] and rec_a["counts"]["rows"] == 4
    assert all(f["size"] == (out / f["path"]).stat().st_size for f in rec_a["files"])
    fold = fold_records(str(out))
    c = fold["counts"]
    assert fold["records"] == 2 and fold["duplicates"] == 0
    assert c["rows"] == 6 and c["rows_ok"] == 4 and c["by_status"] == {"ok": 4, "bad_image": 2}
    assert c["input_tokens"] == 18 and c["output_tokens"] == 30
    # Partition values keep their written type: concept=001 is the text "001", not the integer 1.
    t = read_output(str(out))
    assert t.schema.field("concept").type == pa.string() and set(t.column("concept").to_pylist()) == {"001"}
    assert not [p for p in out.rglob("*.pending")] and not [p for p in out.rglob("*.tmp")]


def test_record_without_its_files_is_dropped_and_redone(tmp_path):
    out = tmp_path / "out"
    ours(out)
    write_committed(pa.concat_tables([block("/d/a.jsonl", range(0, 3)),
                                      block("/d/a.jsonl", range(3, 5), status="engine_error")]), opts(out))
    state = load_shard_state("/d/a.jsonl", ResumeOptions(str(out), {}))
    assert state.done == [[0, 5]] and state.is_done(4) and not state.is_done(5)
    # --retry-errors: the engine_error rows are not done for this run.
    retry = load_shard_state("/d/a.jsonl", ResumeOptions(str(out), {}, ("engine_error",)))
    assert retry.done == [[0, 3]] and list(retry.retry.values()) == [[[3, 5]]]
    # A deleted partition directory: the record is no longer trusted.
    for p in (out / "status=engine_error").rglob("*.parquet"):
        p.unlink()
    assert fold_records(str(out))["records"] == 0 and read_output(str(out)).num_rows == 0
    state = load_shard_state("/d/a.jsonl", ResumeOptions(str(out), {}))
    assert state.done == [] and state.records_dropped == 1
    assert not list((out / "status=ok").rglob("*.parquet"))  # what was left of it is removed


def test_pending_intent_removes_exactly_the_announced_files(tmp_path):
    out = tmp_path / "out"
    ours(out)
    sdir = shard_dir(str(out), "/d/a.jsonl")
    os.makedirs(sdir)
    (out / "status=ok").mkdir()
    (out / "status=ok" / "part-ab-cd-0.parquet").write_bytes(b"half")
    (out / "status=ok" / ".part-ab-cd-1.parquet.tmp").write_bytes(b"tmp")
    (out / "status=ok" / "users-notes.txt").write_text("not ours")
    with open(f"{sdir}/cd.pending", "w") as f:
        json.dump({"files": ["status=ok/part-ab-cd-0.parquet", "status=ok/part-ab-cd-1.parquet"]}, f)
    # Before the first record exists, the orphan is not read as data.
    assert read_output(str(out)).num_rows == 0
    state = load_shard_state("/d/a.jsonl", ResumeOptions(str(out), {}))
    assert state.orphan_files_removed == 2 and state.done == []
    assert sorted(p.name for p in (out / "status=ok").iterdir()) == ["users-notes.txt"]


def test_a_read_task_re_executed_mid_run_sees_only_earlier_runs(tmp_path):
    """Ray re-executes a read task (worker lost, block rebuilt) at any point of a run and needs
    the same blocks again: this run's own records are not done before it, and its commit in
    flight (intent, renamed file, temporary record) is left alone. The next run counts the
    records and cleans the unfinished commit up."""
    out = tmp_path / "out"
    ours(out)
    shard = "/d/a.jsonl"
    write_committed(block(shard, range(0, 2)), WriteOptions(str(out), {}, ("status",), run_id="earlier"))
    write_committed(block(shard, range(2, 4)), WriteOptions(str(out), {}, ("status",), run_id="this"))
    sdir = shard_dir(str(out), shard)
    # A writer of this run between renaming its data file and renaming its record into place:
    (out / "status=ok" / "part-x-ef-0.parquet").write_bytes(b"renamed, not yet recorded")
    with open(f"{sdir}/ef.pending", "w") as f:
        json.dump({"files": ["status=ok/part-x-ef-0.parquet"], "run": "this"}, f)
    with open(f"{sdir}/.ef.json.this.tmp", "w") as f:
        f.write("{}")
    in_flight = sorted(os.listdir(sdir)) + sorted(os.listdir(out / "status=ok"))

    again = load_shard_state(shard, ResumeOptions(str(out), {}, run_id="this"))
    assert again.done == [[0, 2]] and again.orphan_files_removed == 0 and again.records_dropped == 0
    assert sorted(os.listdir(sdir)) + sorted(os.listdir(out / "status=ok")) == in_flight

    after = load_shard_state(shard, ResumeOptions(str(out), {}, run_id="next"))
    assert after.done == [[0, 4]] and after.orphan_files_removed == 1
    assert not [n for n in os.listdir(sdir) if not n.endswith(".json")]
    assert "part-x-ef-0.parquet" not in os.listdir(out / "status=ok")


def test_retry_supersedes_old_error_rows_in_one_record(tmp_path):
    out = tmp_path / "out"
    ours(out)
    write_committed(pa.concat_tables([block("/d/a.jsonl", range(0, 2)),
                                      block("/d/a.jsonl", range(2, 4), status="engine_error")]), opts(out))
    old_uid = json.loads(next((out / "_commits").glob("*/*.json")).read_text())["uid"]
    write_committed(block("/d/a.jsonl", range(2, 4), replaces=old_uid), opts(out))
    t = read_output(str(out), ["row_id", "status"])
    assert sorted(t.column("status").to_pylist()) == ["ok"] * 4 and t.num_rows == 4  # never both
    fold = fold_records(str(out))
    assert fold["counts"]["rows"] == 4 and fold["counts"]["by_status"].get("engine_error", 0) == 0
    assert fold["duplicates"] == 0 and fold["rows_retried"] == 2


def test_output_location_guard(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    shards = [(str(data / "a.jsonl"), "jsonl")]
    for bad in (data, tmp_path):  # the input directory, a parent of it
        with pytest.raises(ConfigError, match="input directory|parent of the input"):
            check_output_location(str(bad), str(data), shards, overwrite=False)
    check_output_location(str(data / "out"), str(data), shards, overwrite=False)  # inside: allowed
    with pytest.raises(ConfigError, match="inside the input"):
        check_output_location(str(data / "out"), str(data), shards, overwrite=True)
    monkeypatch.chdir(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    other = [(str(tmp_path / "elsewhere" / "a.jsonl"), "jsonl")]
    for bad, why in ((".", "current directory"), ("/", "filesystem root|parent of the input"), ("~", "home directory")):
        with pytest.raises(ConfigError, match=why):
            check_output_location(bad, str(tmp_path / "elsewhere"), other, overwrite=True)
    with pytest.raises(ConfigError, match="bucket root"):
        check_output_location("s3://bucket", "s3://other/in", [("s3://other/in/a.jsonl", "jsonl")], overwrite=True)


def test_clear_output_removes_only_what_we_wrote(tmp_path):
    out = tmp_path / "out"
    ours(out)
    write_committed(block("/d/a.jsonl", range(0, 2)), opts(out))
    (out / "README.txt").write_text("the user's")
    left = clear_output(filesystem(str(out))[0], str(out))
    assert [os.path.basename(p) for p in left] == ["README.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["README.txt"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not written by persqa-ray"):
        clear_output(filesystem(str(foreign))[0], str(foreign))
    assert (foreign / "cat.jpg").exists()


def test_listing_skips_outputs_and_underscore_dirs(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.jsonl").write_text("{}\n")
    (data / "sub" / "b.parquet").write_bytes(b"")
    out = data / "nightly"
    ours(out)
    write_committed(block("/d/a.jsonl", range(0, 2)), opts(out))
    (out / "stray.jsonl").write_text("{}\n")
    found = [os.path.relpath(s.path, data) for s in list_shards(str(data))]
    assert found == ["a.jsonl", "sub/b.parquet"]


def test_lease_one_writer(tmp_path):
    out = tmp_path / "out"
    fs = filesystem(str(out))[0]
    first = Lease(fs, str(out), str(out), ttl_s=30).acquire()
    with pytest.raises(LeaseHeld, match=first.owner):
        Lease(fs, str(out), str(out), ttl_s=30).acquire()
    first.release()
    assert not (out / "_lease.json").exists()
    # A lease whose process is gone (a killed run on this host) is taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "_lease.json").write_text(json.dumps({"owner": "crashed", "host": first.host,
                                                 "pid": int(dead.stdout), "pid_start": "1",
                                                 "heartbeat": time.time(), "expires": time.time() + 600}))
    second = Lease(fs, str(out), str(out), ttl_s=30).acquire()
    assert json.loads((out / "_lease.json").read_text())["owner"] == second.owner
    second.release()
    # Another host's lease: live until it expires.
    (out / "_lease.json").write_text(json.dumps({"owner": "far", "host": "other-host", "pid": 1,
                                                 "heartbeat": time.time(), "expires": time.time() + 600}))
    with pytest.raises(LeaseHeld, match="far"):
        Lease(fs, str(out), str(out), ttl_s=30).acquire()
    (out / "_lease.json").write_text(json.dumps({"owner": "far", "host": "other-host", "pid": 1,
                                                 "heartbeat": time.time() - 900, "expires": time.time() - 1}))
    third = Lease(fs, str(out), str(out), ttl_s=30).acquire()
    third.release()


def test_commit_layer_and_lease_on_s3(monkeypatch):
    """The same protocol on a real S3 API (moto_server on 127.0.0.1): units, records, resume state,
    the fold, reading back, clearing, and the lease."""
    from tests.e2e.cluster import S3Server
    s3 = S3Server()
    try:
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        s3.make_bucket("leases")
        url, so = "s3://leases/run/out", s3.storage_options
        fs, root = filesystem(url, so)
        first = Lease(fs, root, url, ttl_s=30).acquire()
        with pytest.raises(LeaseHeld, match=first.owner):
            Lease(filesystem(url, so)[0], root, url, ttl_s=30).acquire()
        write_run_file(fs, root, {"prompt": {}})
        wopts = WriteOptions(path=url, storage_options=so, partition_by=("status", "concept"))
        write_committed(pa.concat_tables([block("s3://leases/in/a.jsonl", range(0, 3)),
                                          block("s3://leases/in/a.jsonl", range(3, 4), status="engine_error")]), wopts)
        state = load_shard_state("s3://leases/in/a.jsonl", ResumeOptions(url, so, ("engine_error",)))
        assert state.done == [[0, 3]] and state.retry
        t = read_output(url, storage_options=so)
        assert t.num_rows == 4 and set(t.column("concept").to_pylist()) == {"001"}
        assert fold_records(url, so)["counts"]["by_status"] == {"ok": 3, "engine_error": 1}
        first.release()
        assert not fs.exists(f"{root}/_lease.json")
        assert clear_output(fs, root) == [] and not [p for p in fs.find(root) if p.endswith(".parquet")]
    finally:
        s3.stop()


def test_a_second_retry_replaces_the_first_retrys_rows(tmp_path):
    """Retry once (the rows fail again), retry again: the second retry replaces the first
    retry's rows, not the original ones; every row is seen once."""
    out = tmp_path / "out"
    ours(out)
    shard = "/d/a.jsonl"
    write_committed(pa.concat_tables([block(shard, range(0, 2)), block(shard, range(2, 4), status="engine_error")]),
                    opts(out))
    for status in ("engine_error", "ok"):
        state = load_shard_state(shard, ResumeOptions(str(out), {}, ("engine_error",)))
        assert state.done == [[0, 2]] and len(state.retry) == 1
        (owner, redo), = state.retry.items()
        assert redo == [[2, 4]]
        write_committed(block(shard, range(2, 4), status=status, replaces=owner), opts(out))
        t = read_output(str(out), ["row_id", "status"])
        assert t.num_rows == 4 and len(set(t.column("row_id").to_pylist())) == 4
    assert sorted(t.column("status").to_pylist()) == ["ok"] * 4
    fold = fold_records(str(out))
    by_status = {k: v for k, v in fold["counts"]["by_status"].items() if v}
    assert fold["counts"]["rows"] == 4 and by_status == {"ok": 4} and fold["duplicates"] == 0
    assert load_shard_state(shard, ResumeOptions(str(out), {}, ("engine_error",))).retry == {}
