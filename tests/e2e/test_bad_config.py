"""Bad configs are refused before any work starts, naming the field (no engine, no Ray)."""
from tests.conftest import demo_config
from tests.e2e.helpers import run_cli, write_config


def test_bad_value_names_field(tmp_path, demo_data, tiny_model):
    cfg = write_config(tmp_path / "c.yaml", demo_config(demo_data[0], tmp_path / "out", tiny_model))
    proc = run_cli(["run", str(cfg), "--set", "engine.batch_size=0"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "engine.batch_size" in proc.stderr and "greater than 0" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before work started


def test_unknown_field_and_missing_input(tmp_path, demo_data, tiny_model):
    cfg = demo_config(demo_data[0], tmp_path / "out", tiny_model)
    cfg["engine"]["max_tokenz"] = 5
    proc = run_cli(["validate", str(write_config(tmp_path / "a.yaml", cfg))], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "engine.max_tokenz: unknown field" in proc.stderr
    cfg = demo_config(tmp_path / "no-such-dir", tmp_path / "out", tiny_model)
    proc = run_cli(["run", str(write_config(tmp_path / "b.yaml", cfg))], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "input.path" in proc.stderr and "does not exist" in proc.stderr


def test_validate_ok_and_explain(tmp_path, demo_data, tiny_model):
    cfg = write_config(tmp_path / "c.yaml", demo_config(demo_data[0], tmp_path / "out", tiny_model))
    proc = run_cli(["validate", str(cfg), "--explain"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "config OK: 2 input shard(s)" in proc.stdout
    assert "image.max_pixels = 50176" not in proc.stdout  # --explain lists defaults, not this file's values
    assert "engine.max_tokens = 128" in proc.stdout and "Upper bound on generated tokens" in proc.stdout
