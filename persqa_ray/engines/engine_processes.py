"""The processes behind an in-process vLLM engine: how they start, and how they end with us.

vLLM starts EngineCore (and EngineCore its worker) with multiprocessing 'spawn'. Four things about
those processes are ours to get right, whichever engine class starts them:
- the user's script is not run again in them (`engine_start`);
- they die with the process that owns them, even when it is SIGKILLed (`engine_start`);
- they share a resource tracker that cannot print tracebacks after a clean finish
  (`no_resource_tracker`);
- a shutdown returns only once they are gone (`descendants`, `wait_for_exit`).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# Read by engine_child_main in the engine's first process only (its parent is this pid).
OWNER_ENV = "PERSQA_ENGINE_OWNER_PID"
_CHILD_MAIN = str(Path(__file__).with_name("engine_child_main.py"))


@contextmanager
def engine_start(settings: dict[str, str]):
    """While vLLM starts its engine processes: `settings` in the environment they inherit, and
    engine_child_main.py as the main module they run first.

    Spawn re-imports the parent's __main__ in the child. A plain script like DataFlow-MM's
    documented example has no `if __name__ == "__main__":` guard, so the child would run the whole
    script again; a Ray worker's __main__ is Ray's. The engine needs nothing from either, so the
    child gets our small main module instead, which ties EngineCore's life to ours: when this
    process is killed (a crashed or SIGKILLed run, where Ray's raylet dies with the driver and
    nobody cleans up after the actor), EngineCore is killed too instead of holding its memory on
    as an orphan."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if main is not None and hasattr(main, k)}
    env = {**settings, OWNER_ENV: str(os.getpid())}
    os.environ.update(env)
    try:
        if main is not None:
            main.__file__, main.__spec__ = _CHILD_MAIN, None
        yield
    finally:
        for k in env:
            os.environ.pop(k, None)
        if main is not None:
            for k in ("__file__", "__spec__"):
                if k in saved:
                    setattr(main, k, saved[k])
                elif hasattr(main, k):
                    delattr(main, k)


def no_resource_tracker() -> None:
    """Hand vLLM's engine processes a resource tracker that tracks nothing (/dev/null), unless this
    process already runs a real one.

    Each spawned process inherits its parent's tracker. When a Ray actor exits, its core worker
    kills the actor's child processes (EngineCore and a tracker started for it) before the UDF's
    teardown runs; vLLM's worker, a grandchild, lives on to clean up, finds the tracker dead,
    relaunches an empty one, and that one printed a KeyError traceback for every shared-memory name
    it never saw, after every successful run. A tracker started outside the actor's process tree
    survives, but changed which engine processes Ray cleans up after a killed actor, so the process
    tree stays as vLLM makes it and only the tracker's pipe goes nowhere. What is lost is the
    tracker's clean-up of shared memory after a crash, which it could not count on anyway (Ray
    kills it with the rest of the actor's processes); vLLM unlinks its own segments when it shuts
    down."""
    from multiprocessing import resource_tracker
    tracker = resource_tracker._resource_tracker
    if getattr(tracker, "_fd", None) is None:
        tracker._fd, tracker._pid = os.open(os.devnull, os.O_WRONLY), None


def descendants(exclude: frozenset[int] | set[int] = frozenset(), children_only: bool = False) -> list:
    """This process's descendants (psutil handles), or only its children, but those in `exclude`;
    [] without psutil."""
    try:
        import psutil
        return [p for p in psutil.Process().children(recursive=not children_only) if p.pid not in exclude]
    except Exception:  # noqa: BLE001 - psutil missing: nothing to wait for
        return []


def wait_for_exit(procs: list, timeout_s: float = 8.0) -> None:
    """Return once the engine's processes have exited.

    vLLM's shutdown returns when it has signalled EngineCore, while EngineCore's worker is still
    exiting. If this process (a Ray actor) exits first, Ray kills its children; the worker is a
    grandchild, re-parented when EngineCore exits, so the processes are taken before shutdown
    (`descendants`) and waited for by handle, not found again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not [p for p in procs if _running(p)]:
            return
        time.sleep(0.05)
    log.debug("engine processes still running after %.0f s", timeout_s)


def _running(p) -> bool:
    import psutil
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
