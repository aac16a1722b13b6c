"""Generate stage (engine actor pool): one engine per actor, built once; answers checked here.

Each input row that reached this stage with status ok leaves as one QA row per item (k open
questions, plus recognition pairs), each `ok`, `invalid_output` (refused by the answer policy after
engine.max_retries re-asks with new seeds) or `engine_error`. A row that failed earlier leaves as
its one error row. Pixels are dropped here.

One async stage for every engine: Ray Data calls it with several batches in flight per actor;
each engine's `agenerate` either submits at once (vLLM's async engine, an HTTP client) or runs a
blocking engine in a thread (`engines/base.SyncEngine`). An engine that died or hung is rebuilt
(engine.max_restarts); past that the actor exits so Ray replaces it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import pyarrow as pa

from persqa_ray import schema
from persqa_ray.engines.base import EngineSpec, GenerationRequest, GenerationResult
from persqa_ray.personalization.options import PersonalizationOptions
from persqa_ray.stages.base import Stage
from persqa_ray.stages.decode import DecodeOptions, ReferenceImages
from persqa_ray.stages.qa_work import BatchWork

if TYPE_CHECKING:
    from persqa_ray.pipeline.plan import Plan

log = logging.getLogger(__name__)
MAX_ACTOR_EXITS = 3  # engine actors that may give up in one run before the run fails


@dataclass(frozen=True)
class GenerateOptions:
    engine: EngineSpec
    model_name: str
    prompt_version: str
    seed: int
    pers_qa_format: str
    max_retries: int
    guided_prefix: bool
    max_engine_restarts: int = 3
    fault: Optional[str] = None  # PERSQA_FAULT of the driver (tests only): see GenerateStage._maybe_fault

    @classmethod
    def from_config(cls, cfg, templates) -> "GenerateOptions":
        e = cfg.engine
        return cls(engine=e.spec(cfg.prompt.seed), model_name=e.model, prompt_version=templates.prompt_version,
                   seed=cfg.prompt.seed, pers_qa_format=cfg.output.pers_qa_format or templates.pers_qa_format,
                   max_retries=e.max_retries, guided_prefix=e.guided_prefix, max_engine_restarts=e.restart_budget)


# A CI rehearsal once saw a restart stop after "engine died; recreating it" for good: no new engine
# was started in 6 minutes. The dead engine's shutdown never returned (or never began: it ran in the
# loop's shared thread pool, which other work on the loop can use too). Cause not reproduced; so it
# runs in a daemon thread of its own (an executor's thread would be joined when the actor exits) and
# the restart waits for it at most this long (the engine's processes are dead already; what a stuck
# shutdown still holds is freed with the actor).
DEAD_ENGINE_SHUTDOWN_WAIT_S = 60.0


async def _shut_down_dead(engine, wait_s: float = DEAD_ENGINE_SHUTDOWN_WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def shut_down() -> None:
        try:
            engine.shutdown()
        except Exception:  # noqa: BLE001 - best effort: the engine is dead already
            log.debug("dead engine's shutdown raised", exc_info=True)
        finally:
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    threading.Thread(target=shut_down, name="persqa-dead-engine-shutdown", daemon=True).start()
    try:
        await asyncio.wait_for(done, wait_s)  # on timeout `done` is cancelled: the thread's set is skipped
    except asyncio.TimeoutError:
        log.warning("the dead engine's shutdown has not returned after %.0f s: starting a new engine anyway",
                    wait_s)


class GenerateStage:
    def __init__(self, opts: GenerateOptions, personalization: PersonalizationOptions, stats: Any = None,
                 engine: Any = None, references: Optional[DecodeOptions] = None):
        self.opts, self.pers, self.stats = opts, personalization, stats
        # Reference images shown in prompts, decoded here once per concept (not carried by every row).
        self.references = ReferenceImages(references) if references is not None else None
        self.engine_restarts = 0
        self._engine_calls = 0
        self.in_flight = self.max_in_flight = 0
        self._restart_lock = None
        # `engine`: an already running engine (the DataFlow face and tests share one); otherwise the
        # actor builds its own from the spec, once (the stage's setup).
        self._owns_engine = engine is None
        if stats is not None and self._owns_engine:
            import ray
            exits = ray.get(stats.counter.remote("engine_actor_exits"))
            if exits >= MAX_ACTOR_EXITS:
                raise RuntimeError(f"engine actors exited {exits} times in this run because their engines kept "
                                   "dying or hanging; stopping the run (its committed rows are kept: rerun to resume)")
        self.engine = engine if engine is not None else opts.engine.build()
        if stats is not None:
            import ray
            self._where = (ray.get_runtime_context().get_node_id(), os.getpid())
            stats.actor_started.remote("generate", *self._where)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
            if self.stats is not None:
                self.stats.record_max.remote("max_batches_in_flight", self.max_in_flight)
        try:
            o = self.opts
            work = BatchWork(batch, self.pers, o.seed, o.guided_prefix, o.max_retries, self.references)
            rounds = work.rounds()
            try:
                requests = next(rounds)
                while True:
                    requests = rounds.send(await self._generate(requests))
            except StopIteration:
                pass
            constants = {"language": self.pers.language, "model": o.model_name, "seed": o.seed,
                         "prompt_version": o.prompt_version}
            return work.table(batch, constants, o.pers_qa_format)
        finally:
            self.in_flight -= 1

    async def _generate(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        if self._restart_lock is None:
            self._restart_lock = asyncio.Lock()
        if self._restart_lock.locked():  # an engine restart is under way: send to the new engine
            async with self._restart_lock:
                pass
        engine = self.engine
        await self._maybe_fault()
        results = await engine.agenerate(reqs)
        # Errors from an engine that was replaced meanwhile, or that is dead: retry on the current one.
        if any(r.error for r in results) and (self.engine is not engine or not engine.alive()):
            async with self._restart_lock:  # concurrent batches all see the death: restart once
                if self.engine is engine and self.engine_restarts < self.opts.max_engine_restarts:
                    await self._restart_engine()
            if self.engine is not engine:
                results = await self.engine.agenerate(reqs)
            self._give_up_if_dead(results)
        return results

    async def _maybe_fault(self) -> None:
        """Fault injection (PERSQA_FAULT=engine_kill or engine_freeze, tests only): once per run, as
        this actor's second engine call starts (its first batch answered or still in flight), its
        vLLM engine process is SIGKILLed or SIGSTOPped: a real death or hang, mid-run. A test that
        sent the signal itself had to race the run for that moment (catch the engine process between
        the first commit and the engine's last answer), and once lost it in CI."""
        sig = {"engine_kill": signal.SIGKILL, "engine_freeze": signal.SIGSTOP}.get(self.opts.fault or "")
        if sig is None or not self._owns_engine or self.stats is None:
            return
        self._engine_calls += 1
        if self._engine_calls != 2 or await self.stats.counter.remote("fault_engine_signalled"):
            return  # not this call, or done already (a replacement actor runs clean)
        self.stats.add.remote("fault_engine_signalled", 1)
        # The engine's own first process (EngineCore; its worker dies with it), as the engine
        # recorded it when it started: looking it up by title in /proc missed it in 2 of 8 runs.
        pid = next(iter(getattr(self.engine, "process_ids", ())), None)
        if pid is None:
            raise RuntimeError(f"PERSQA_FAULT={self.opts.fault}: this engine has no process of its own to signal")
        log.warning("PERSQA_FAULT=%s: signalling engine process %d", self.opts.fault, pid)
        os.kill(pid, sig)

    async def _restart_engine(self) -> None:
        self.engine_restarts += 1
        log.warning("engine died; recreating it (restart %d)", self.engine_restarts)
        await _shut_down_dead(self.engine)
        self.engine = self.opts.engine.build()
        if self.stats is not None:
            self.stats.add.remote("engine_restarts", 1)

    def _give_up_if_dead(self, results: list[GenerationResult]) -> None:
        """Restart budget spent and the engine still dead: this actor exits, so Ray replaces it
        and retries its batches on a fresh engine, instead of every later row becoming an
        engine_error answered by a dead engine. (A shared engine, from the DataFlow face or a
        test, is not ours to give up: its errors stay per row.)"""
        if not self._owns_engine or not any(r.error for r in results) or self.engine.alive():
            return
        log.error("engine dead after %d restart(s) (engine.max_restarts): this actor exits for Ray to "
                  "replace it", self.engine_restarts)
        if self.stats is not None:
            import ray
            ray.get(self.stats.add.remote("engine_actor_exits", 1))
        os._exit(1)

    def __del__(self):  # the stage's teardown
        engine = getattr(self, "engine", None)
        if engine is not None and getattr(self, "_owns_engine", False):
            engine.shutdown()
            if getattr(self, "_where", None) and self.stats is not None:
                # The window's driver waits for this before it ends (pipeline/run.py _window).
                try:
                    import ray
                    ray.get(self.stats.actor_stopped.remote("generate", *self._where), timeout=5)
                except Exception:  # noqa: BLE001 - the run is over either way
                    pass


def generate_stage(p: "Plan", stats: Any = None) -> Stage:
    e = p.config.engine
    return Stage(
        "generate", GenerateStage, {"opts": p.generate, "personalization": p.personalization, "stats": stats,
                                    "references": p.decode if p.personalization.reference_images_in_prompt else None},
        needs=("row_id", "status", "error", "concept", "tag", "image_concepts", "subject_type", "subject_type_source",
               schema.ITEMS, schema.DETECT, schema.REF_IMAGES, schema.REF_CAPTIONS, schema.PIXELS, schema.SHAPES),
        adds=tuple(schema.OUTPUT_COLUMNS), batch_size=e.batch_size, pool=e.concurrency, in_flight=e.in_flight,
        num_cpus=e.num_cpus, num_gpus=e.gpus, resources=dict(e.resources))
