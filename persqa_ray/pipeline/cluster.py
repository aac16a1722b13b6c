"""Where the run happens: joining or starting Ray, what `engine.num_gpus: auto` becomes, the
short-lived workers that drive the run's Ray Data executions, and waiting for the engine actors to
shut their engines down."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from persqa_ray.config import ConfigError, PersQAConfig
from persqa_ray.versions import check_ray

if TYPE_CHECKING:
    from persqa_ray.pipeline.plan import Plan

log = logging.getLogger("persqa_ray")
T = TypeVar("T")


def init_ray(cfg: PersQAConfig) -> None:
    """Join the configured cluster, the one a `ray job submit` runs in, or start a local Ray."""
    check_ray()
    if ray.is_initialized():
        return
    # --quiet: no worker/engine log lines and no Ray INFO lines (Ray Data's own level comes from
    # RAY_DATA_LOG_LEVEL, which the CLI sets before Ray Data configures its loggers).
    quiet = os.environ.get("PERSQA_QUIET") == "1"
    level = logging.WARNING if quiet else logging.INFO
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address or None, log_to_driver=not quiet, logging_level=level)
        return
    # Small machines: more logical CPUs than cores, so actors holding "all" CPUs cannot starve
    # the read tasks (a measured deadlock on 2 cores; shared/ENVIRONMENT.md).
    num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, object_store_memory=cfg.ray.object_store_memory,
             include_dashboard=False, log_to_driver=not quiet, logging_level=level)


def resolve_gpus(p: "Plan") -> "Plan":
    """engine.num_gpus 'auto' -> a number, from the GPUs of the Ray cluster we are on. A GPU
    request a local Ray can never meet (this machine has none) is refused at once instead of
    waiting forever; on a joined cluster it is only warned about (an autoscaler may add GPU nodes)."""
    e = p.config.engine
    if e.kind != "vllm":
        return p  # openai / standin run in CPU actors
    gpus = ray.cluster_resources().get("GPU", 0)
    if e.num_gpus == "auto":
        n = float(e.tensor_parallel_size) if gpus > 0 else 0.0
        log.info("engine.num_gpus auto -> %g (%g GPU(s) in the Ray cluster)", n, gpus)
    else:
        n = float(e.num_gpus)
        if n > gpus:
            joined = bool(p.config.ray.address or os.environ.get("RAY_ADDRESS"))
            msg = (f"engine.num_gpus: {n:g} GPU(s) per engine actor, but the Ray cluster has {gpus:g}; "
                   "set engine.num_gpus: auto (or 0: the CPU engine, `pip install 'persqa_ray[cpu]'`), "
                   "or run on a cluster with GPU nodes")
            if not joined:
                raise ConfigError(msg)
            log.warning("%s (waiting for an autoscaler to add them)", msg)
    return dataclasses.replace(p, config=p.config.model_copy(
        update={"engine": e.model_copy(update={"num_gpus": n})}))


def in_own_worker(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a Ray worker process of its own on this node, ended as soon as fn returns.

    Every Ray Data execution of a run (each window, the concept and duplicate-id passes) is driven
    this way, not from the run's driver. Why: Ray keeps some memory per block in the process that
    drives an execution, and not all of it is given back when the execution ends (≈ 8 KiB a block,
    native memory; docs/BENCHMARKS.md), so a driver that drove them all grew with the dataset
    (≈ 1.7 GiB projected at 100M rows). A process per execution takes that memory with it.
    An actor that is killed, not a task with max_calls=1: such a task's worker stayed on, idle, after
    driving a window, one more per window (why, not found: after a plain Ray Data pipeline it does
    exit; tests/e2e/test_cli.py catches it). Killing it loses only
    what it owned: the execution is over, its output committed, its engines already shut down (the
    window waits for them). On this node: the engine actors a window waits for are looked for on
    its node (wait_for_engine_actors). Not retried: an execution that failed stops the run, and its
    rerun resumes from the commit records. fn's own exception is raised here, not Ray's wrapper."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    worker = _ExecutionDriver.options(scheduling_strategy=here).remote()
    try:
        return ray.get(worker.call.remote(fn, args, os.environ.get("PERSQA_QUIET") == "1", sys.stdout.isatty()))
    except ray.exceptions.RayTaskError as e:
        raise (e.cause if isinstance(e.cause, Exception) else e) from e
    finally:
        ray.kill(worker)


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class _ExecutionDriver:
    def call(self, fn, args: tuple, quiet: bool, terminal: bool):
        import ray.data
        ctx = ray.data.DataContext.get_current()
        if quiet:  # the CLI's --quiet, also on a joined cluster whose workers did not inherit its env
            ctx.enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        if not terminal:
            # Progress as Ray Data gives it to a driver writing to a file or pipe: a log line now and
            # then. In a worker it would send bars to the driver (tqdm_ray), printed there line by line.
            ctx.use_ray_tqdm = False
        return fn(*args)


def cause_note(e: BaseException) -> str:
    """'cause: <type>: <message>' of the innermost exception `e` wraps ('' if none).

    Across Ray the link is kept only as text: a task's error comes back as a RayTaskError whose
    `cause` is the task's exception without *its* causes (Ray Data's "UDF failed to process a data
    block" loses the stage's own exception that way, and so do notes added to it); the RayTaskError's
    text still has the remote traceback, the innermost exception first, before Python's "direct
    cause" line. Elsewhere exceptions link by __cause__."""
    inner, seen = e, set()
    while id(inner) not in seen:
        seen.add(id(inner))
        text = str(inner) if isinstance(inner, ray.exceptions.RayTaskError) else ""
        if _DIRECT_CAUSE in text:
            roots = [ln.strip() for ln in text.split(_DIRECT_CAUSE)[0].splitlines()
                     if ln.strip() and not ln[:1].isspace()]
            if roots:
                return f"cause: {roots[-1][-1000:]}"
        nxt = [c for c in (inner.__cause__, getattr(inner, "cause", None))
               if isinstance(c, BaseException) and id(c) not in seen]
        if not nxt:
            break
        inner = nxt[0]
    return "" if inner is e else f"cause: {type(inner).__name__}: {str(inner)[-1000:]}"


_DIRECT_CAUSE = "The above exception was the direct cause of the following exception:"


def wait_for_engine_actors(stats, timeout_s: float = 15.0) -> None:
    """Wait until the engine actors of this machine have shut their engines down. When a window
    ends, Ray Data lets its actors exit on their own; if the window's own driver (in_own_worker) is
    killed first, the actors it owns die with it mid-shutdown and vLLM's processes print tracebacks
    after a successful summary.
    Actors on other nodes, or killed ones, are not waited for (their pid is not ours to see)."""
    node = ray.get_runtime_context().get_node_id()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        live = [pid for n, pid in ray.get(stats.live_actors.remote("generate")) if n == node and pid_alive(pid)]
        if not live:
            return
        time.sleep(0.2)
    log.debug("engine actors still shutting down after %.0f s", timeout_s)


def pid_alive(pid: int) -> bool:
    """A process of this machine that has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
