"""Run the CLI as a real subprocess (its own process group, always cleaned up) and inspect output."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

ENGINE_PROCESS_MARKERS = ("EngineCore", "VLLM::EngineCore")


def run_cli(args: list[str], cwd: Path, timeout: float = 480, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "persqa_ray", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"CLI timed out after {timeout}s\n{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@contextmanager
def cli_running(args: list[str], cwd: Path, env: dict | None = None):
    """The CLI started in its own process group (so a test can SIGKILL all of it); whatever
    happens in the block, nothing of it is left running afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", "persqa_ray", *args], cwd=cwd, start_new_session=True,
                            env=dict(os.environ, **(env or {})), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()


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


def _live_processes():
    """(pid, title, command line) of every process on the machine that is not a zombie."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            yield pid, comm, cmd


def engine_processes() -> list[str]:
    """Live vLLM engine processes on this machine that this test process did not start."""
    return [f"{pid} {comm} {cmd[:120]}" for pid, comm, cmd in _live_processes()
            if any(m in cmd or m in comm for m in ENGINE_PROCESS_MARKERS) and not _is_ours(pid)]


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (a CLI started with start_new_session, and everything it
    started: Ray's workers are in it, though not in its process group)."""
    found = []
    for pid, _, _ in _live_processes():
        try:
            if os.getsid(int(pid)) == sid:
                found.append(int(pid))
        except OSError:
            continue
    return found


def pids_of(marker: str) -> list[int]:
    """Live processes whose title or command line contains `marker`."""
    return [int(pid) for pid, comm, cmd in _live_processes() if marker in cmd or marker in comm]


def commit_records(out: Path) -> list[Path]:
    """The commit records of an output (`_commits/<shard key>/<uid>.json`)."""
    return [p for p in out.glob("_commits/*/*.json") if not p.name.startswith(".")]


def wait_for_commits(proc, out: Path, n: int, timeout: float = 300) -> None:
    """Wait until a running CLI has committed n output units (it must still be running)."""
    deadline = time.time() + timeout
    while len(commit_records(out)) < n:
        assert proc.poll() is None, "the run ended before the expected commits"
        assert time.time() < deadline, f"no {n} commits in {timeout}s"
        time.sleep(0.05)
