"""The notebook API in-process: build_dataset is lazy, take() works, k QA rows per image."""
import pytest
import ray

import persqa_ray
from persqa_ray.pipeline.executors import BLOCK_TARGET_BYTES
from tests.conftest import demo_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def test_build_dataset_k3_then_run(local_ray, demo_data, tiny_model, tmp_path):
    data_dir, manifest = demo_data
    cfg = demo_config(data_dir, tmp_path / "out", tiny_model, prompt={"questions_per_image": 3, "seed": 5})
    users_block_target = ray.data.DataContext.get_current().target_max_block_size
    ds = persqa_ray.build_dataset(cfg)
    assert isinstance(ds, ray.data.Dataset)
    # The run's smaller block target (pipeline/executors.py) is the dataset's own, not the notebook's.
    assert ds.context.target_max_block_size == BLOCK_TARGET_BYTES < users_block_target
    assert ray.data.DataContext.get_current().target_max_block_size == users_block_target
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # lazy: nothing written
    rows = ds.take_all()
    ok_ids = {r["row_id"] for r in rows if r["status"] == "ok"}
    err = [r for r in rows if r["status"] != "ok"]
    assert len(ok_ids) == manifest["rows"] - 2 and len(err) == 2
    assert len(rows) == 3 * len(ok_ids) + 2  # k rows per ok input row, one per failed row
    for rid in ok_ids:
        qa = sorted((r for r in rows if r["row_id"] == rid), key=lambda r: r["qa_index"])
        assert [r["qa_index"] for r in qa] == [0, 1, 2]
        assert len({r["template_id"] for r in qa}) == 3  # distinct questions
        assert {r["template_id"].split("-")[1] for r in qa} == {"act", "scn"}  # spread over families
        assert all(r["answer"].startswith("<mam>") for r in qa)


def test_readme_notebook_snippet_as_written(tmp_path, tiny_model, repo_root):
    """The README's notebook block, run exactly as written from a copy of the repository root
    after the demo's set-up (configs/, demo_data/, models/), in a clean environment."""
    import shutil
    import subprocess
    import sys

    import make_demo_data

    from tests.compat.test_dataflow_examples import readme_block
    from tests.conftest import clean_env
    shutil.copytree(repo_root / "configs", tmp_path / "configs")
    manifest = make_demo_data.make(tmp_path / "demo_data")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-qwen2-vl").symlink_to(tiny_model)
    (tmp_path / "nb.py").write_text(readme_block("notebook-example"))
    proc = subprocess.run([sys.executable, "nb.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=clean_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    import re
    counts = [line for line in proc.stdout.splitlines() if re.fullmatch(r"\d+ \d+ \d+", line.strip())]
    rows_in, rows_ok, table_rows = map(int, counts[-1].split())
    import json
    s = json.loads((tmp_path / "nb_output" / "_summary.json").read_text())
    # Every input row plus one row per concept for the demo's text-only concept QA.
    assert s["text_qa_concepts"] == 2 and rows_in == manifest["rows"] + 2
    # errors_by_status counts QA rows, rows_error input rows: the broken and the missing image fail
    # their rows, and with the random model the two-concept photo's answer may fail too (it rarely
    # names both tags).
    assert rows_ok == s["rows_ok"] == rows_in - s["rows_error"] and s["rows_error"] in (2, 3)
    assert s["errors_by_status"]["bad_image"] == 1 and s["errors_by_status"]["missing_image"] == 1
    assert set(s["errors_by_status"]) <= {"bad_image", "missing_image", "invalid_output"}
    assert (s["rows_error"] == 3) == ("invalid_output" in s["errors_by_status"])
    assert table_rows > rows_in  # the demo config's recognition pairs: more QA rows than inputs
    import pyarrow.dataset as pads
    assert pads.dataset(str(tmp_path / "nb_parquet"), format="parquet").count_rows() == table_rows
