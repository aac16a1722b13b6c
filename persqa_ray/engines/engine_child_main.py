"""Run as the main module of vLLM's engine processes (engine_processes.engine_start), before vLLM's
own code: the engine's first process asks the kernel to kill it when its owner dies.

It is executed by path under the name __mp_main__, so it must stay free of imports from
persqa_ray and of anything slow. Only the process whose parent is the owner acts: EngineCore's
worker runs this file too, and vLLM already ends it when EngineCore ends (after the worker's own
clean-up, which a signal here would cut short).
"""
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def _die_with_owner() -> None:
    owner = os.environ.get("PERSQA_ENGINE_OWNER_PID")
    if not owner or not owner.isdigit() or os.getppid() != int(owner):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: Ray's own child clean-up is all there is
        return
    if os.getppid() != int(owner):  # the owner died before the request took effect
        os._exit(1)


_die_with_owner()
