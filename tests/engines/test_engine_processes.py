"""vLLM's engine processes end with the process that started them, even when it is SIGKILLed (a
crashed run: Ray's raylet dies with the driver and nobody cleans up after the engine actor)."""
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import clean_env

pytestmark = pytest.mark.slow

# No `if __name__ == "__main__":` guard, as in a user's plain script: the engine's processes must
# not run it again (they would start engines of their own).
SCRIPT = """
import sys, time
from persqa_ray.engines.vllm_engine import VLLMEngine
from persqa_ray.engines.engine_processes import descendants
eng = VLLMEngine(sys.argv[1], enforce_eager=True, max_model_len=2048, max_tokens=8)
print("PIDS", *[p.pid for p in descendants()], flush=True)
time.sleep(600)
"""


def test_engine_processes_die_with_a_killed_owner(tmp_path, tiny_model):
    (tmp_path / "owner.py").write_text(SCRIPT)
    owner = subprocess.Popen([sys.executable, "owner.py", tiny_model], cwd=tmp_path, env=clean_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    engine = []
    try:
        line = ""
        deadline = time.time() + 300
        while not line.startswith("PIDS") and time.time() < deadline and owner.poll() is None:
            line = owner.stdout.readline()
        engine = [psutil.Process(int(p)) for p in line.split()[1:]]
        assert any("EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()) for p in engine), line
        owner.kill()  # SIGKILL: no teardown runs in the owner
        owner.wait(timeout=30)
        gone, alive = psutil.wait_procs(engine, timeout=20)
        assert alive == [], [p.pid for p in alive]
    finally:
        # Only the owner's processes (orphans too, when it fails): the session's shared engine is
        # this test process's child as well.
        if owner.poll() is None:
            engine += psutil.Process(owner.pid).children(recursive=True)
            owner.kill()
        for p in engine:
            try:
                p.kill()
            except psutil.Error:
                pass
