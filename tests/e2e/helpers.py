"""Run the CLI as a real subprocess (its own process group, always cleaned up) and inspect output."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

ENGINE_PROCESS_MARKERS = ("EngineCore", "VLLM::EngineCore")


def run_cli(args: list[str], cwd: Path, timeout: float = 480) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.Popen([sys.executable, "-m", "persqa_ray", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"CLI timed out after {timeout}s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def summary_of(out_dir: Path) -> dict:
    return json.loads((out_dir / "_summary.json").read_text())


def _ppid(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _is_ours(pid: str) -> bool:
    """A descendant of this test process (the session's shared engine fixture), not a leftover."""
    me, p = os.getpid(), int(pid)
    for _ in range(64):
        if p in (0, 1):
            return False
        if p == me:
            return True
        p = _ppid(str(p))
    return False


def engine_processes() -> list[str]:
    """Live vLLM engine processes on this machine that this test process did not start."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(m in cmd or m in comm for m in ENGINE_PROCESS_MARKERS) and not _is_ours(pid):
            found.append(f"{pid} {comm} {cmd[:120]}")
    return found


def pids_of(marker: str) -> list[int]:
    """Live (not zombie) processes whose title or command line contains `marker`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            found.append(int(pid))
    return found
