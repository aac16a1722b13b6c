"""The whole catalog of bad inputs (scripts/make_bad_inputs.py) through the CLI: every row comes out
exactly once with its own status, the unparseable shard is named, and the job exits 0."""
import json
from pathlib import Path

import pytest

import persqa_ray
from tests.conftest import demo_config
from tests.e2e.helpers import run_cli, summary_of, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def catalog_run(tmp_path_factory, tiny_model):
    import make_bad_inputs
    work = tmp_path_factory.mktemp("bad")
    data = work / "bad"
    expected = make_bad_inputs.make(data)
    cfg = demo_config(data, work / "out", tiny_model, input={
        "id_column": "id", "max_record_bytes": 65536,
        # The input's directory, and the one bucket the unreachable_s3 case may reach (roots apply to
        # URLs too: s3_other_bucket is refused without a request).
        "allowed_roots": [str(data), "s3://persqa-unreachable"],
        # The unreachable S3 case: an endpoint nobody listens on, one quick attempt.
        "storage_options": {"key": "persqa-test-key", "secret": "persqa-test-secret",
                            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-west-2"},
                            "config_kwargs": {"connect_timeout": 1, "read_timeout": 1,
                                              "retries": {"max_attempts": 1}}}})
    proc = run_cli(["run", str(write_config(work / "bad.yaml", cfg))], cwd=work)
    return work, expected, proc


def test_job_completes(catalog_run):
    _, _, proc = catalog_run
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_every_case_has_its_status(catalog_run):
    work, expected, _ = catalog_run
    rows = persqa_ray.read_output(str(work / "out")).to_pylist()
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(r.get("case"), []).append(r)
    assert len(expected["cases"]) >= 45
    for case in expected["cases"]:
        name, status = case["case"], case["status"]
        if name in ("malformed_json_line", "json_not_object", "overlong_jsonl_line"):
            continue  # unparsed lines have no 'case' column: checked below
        got = by_case.get(name)
        assert got, f"{name}: no output row"
        assert {r["status"] for r in got} == {status}, (name, [(r["status"], r["error"]) for r in got])
        for r in got:
            assert (r["error"] is None) == (status == "ok"), name
            if status == "ok":
                assert r["answer"].startswith("<mam>"), name
    unparsed = [r["error"] for r in by_case[None]]
    assert len(unparsed) == 3 and all(r["status"] == "bad_record" for r in by_case[None])
    assert any("not valid JSON" in e and "line 6" in e for e in unparsed)
    assert any("a list, not an object" in e for e in unparsed)
    assert any("over input.max_record_bytes=65536" in e for e in unparsed)  # never parsed, never held whole
    assert "allowed format" in by_case["eps_named_jpg"][0]["error"]
    assert by_case["id_10000_chars"][0]["row_id"] == "i" * 10_000
    assert all("outside input.allowed_roots" in by_case[c][0]["error"]
               for c in ("readable_outside_roots", "symlink_out_of_roots", "s3_other_bucket", "file_url_outside_roots"))
    assert len(by_case["missing_image_column"]) == 2
    assert "\ufffd" in by_case["non_utf8_text"][0]["caption"]  # bad bytes replaced, row kept


def test_accounting_and_shard_errors(catalog_run):
    work, expected, _ = catalog_run
    s = summary_of(work / "out")
    assert s["rows_in"] == expected["rows_in"]
    assert s["rows_in"] == s["rows_ok"] + s["rows_error"] and s["duplicates"] == 0
    bad = [k for k in s["shard_errors"] if k.endswith(expected["corrupt_shard"])]
    assert len(bad) == 1 and s["shard_errors"][bad[0]]  # named, with the reason
    rows = persqa_ray.read_output(str(work / "out"), ["row_id", "qa_index"]).to_pylist()
    assert len({(r["row_id"], r["qa_index"]) for r in rows}) == len(rows) == s["rows_in"]


def test_no_credentials_anywhere(catalog_run):
    """The S3 key and secret were really in use (the unreachable_s3 case went through s3fs with
    them); they must not appear in the CLI's output, the summary, the rows or Ray's session logs."""
    work, _, proc = catalog_run
    texts = [proc.stdout, proc.stderr, (work / "out" / "_summary.json").read_text()]
    texts += [json.dumps(r, default=str) for r in persqa_ray.read_output(str(work / "out")).to_pylist()]
    logs = [p for p in Path("/tmp/ray").glob("session_*/logs/**/*") if p.is_file()]
    assert logs  # the CLI's local Ray wrote its session logs here
    texts += [p.read_bytes().decode(errors="replace") for p in logs]
    for secret in ("persqa-test-key", "persqa-test-secret"):
        assert not any(secret in t for t in texts), secret


def test_report_shows_only_images_the_run_decoded(catalog_run, tmp_path):
    """The report opens no reference the run refused (a readable photo outside the roots, a
    symlink out of them, a URL): only rows the run decoded get a thumbnail, through the run's own
    limits; a file name that is HTML markup is escaped."""
    import re
    work, expected, _ = catalog_run
    html_path = tmp_path / "r.html"
    proc = run_cli(["report", str(work / "out"), "--out", str(html_path), "--sample", "500"], cwd=tmp_path,
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = html_path.read_text(encoding="utf-8")
    rows = persqa_ray.read_output(str(work / "out"), ["image", "status"]).to_pylist()
    decoded = [r for r in rows if r["status"] in ("ok", "invalid_output", "engine_error")]
    shown = re.findall(r"data-shown='1' alt='([^']*)'", text)
    assert len(shown) == len(decoded) and text.count("data-shown='0'") == len(rows) - len(decoded)
    private = [a for a in re.findall(r"data-shown='(\d)' alt='([^']*)'", text)
               if "private" in a[1] or "link_out" in a[1]]
    assert len(private) == 2 and all(flag == "0" for flag, _ in private)
    assert "<svg onload" not in text and "&lt;svg onload=alert(1)&gt;.png" in text
