"""The engine protocol: requests in, results out, in order. One file per implementation.

The pipeline holds an `EngineSpec` (small, picklable) and builds the real engine inside the
actor that uses it, once (Daft's provider pattern): nothing heavy crosses the wire.

Life cycle: `EngineSpec.build()` is the setup (it starts the engine: vLLM's processes, an HTTP
client); `shutdown()` the teardown. Between them both calls work on every engine: `agenerate`
(the generate stage's, in an actor's event loop) and `generate` (the DataFlow servings').
`SyncEngine` and `AsyncEngine` give each engine the call it does not have natively.
"""
from __future__ import annotations

import asyncio
import importlib
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Coroutine, Optional, Protocol, Sequence, TypeVar, Union

import numpy as np

T = TypeVar("T")


@dataclass
class GenerationRequest:
    system_prompt: str
    user_prompt: str
    images: list[np.ndarray]          # RGB uint8 HxWx3, already at the model's size
    seed: Optional[int] = None        # per-request sampling seed (reproducible reruns)
    answer_prefix: Union[str, tuple[str, ...], None] = None  # structured output: the answer begins with
                                                             # this (or with one of these)
    prompt: Optional[str] = None      # an already chat-templated prompt (used as is when set)
    choices: Optional[tuple[str, ...]] = None  # structured output: the answer is exactly one of these
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, text) turns of a conversation, oldest first
    references: tuple[tuple[np.ndarray, str], ...] = ()  # (image, caption) shown before `images` (RAP)

    def all_images(self) -> list[np.ndarray]:
        """Every image of the request in the order the prompt shows them: references, then the query."""
        return [im for im, _ in self.references] + list(self.images)


@dataclass
class GenerationResult:
    text: Optional[str]
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    error: Optional[str] = None       # engine-side failure for this request only
    latency_s: float = 0.0            # submission to last token


class Engine(Protocol):
    model_name: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in the same order; per-request failures go in `error`."""

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """The same contract from an event loop (the generate stage: several batches in flight)."""

    def alive(self) -> bool:
        """False once the engine is dead or hung: the stage rebuilds it (engine.max_restarts)."""

    def shutdown(self) -> None:
        """Release the engine (processes, memory, connections). The teardown."""


class SyncEngine:
    """Base of engines whose native call blocks (vLLM's offline LLM, a user's serving object):
    `agenerate` runs it in a thread, one call at a time (such engines are not thread-safe), so the
    actor's event loop stays free."""

    _lock: Optional[asyncio.Lock] = None

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        raise NotImplementedError

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            return await asyncio.to_thread(self.generate, list(requests))

    def alive(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass


class AsyncEngine:
    """Base of engines whose native call is a coroutine (vLLM's async engine, an HTTP client):
    `generate` runs it on this process's background event loop (`run_sync`)."""

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        raise NotImplementedError

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return run_sync(self.agenerate(requests))

    def alive(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass


_LOOP: Optional[asyncio.AbstractEventLoop] = None
_LOOP_LOCK = threading.Lock()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from synchronous code on one event loop per process, in a thread of its own.

    One loop, because an async client's connections belong to the loop they were opened on: the
    DataFlow face calls an engine from the operator's stage and from the serving's own methods,
    and both must reach the same loop."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed():
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="persqa-engine-loop", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coro, _LOOP).result()


def chat_messages(req: GenerationRequest, image_parts: list[dict]) -> list[dict]:
    """The turns every engine sends: system, any earlier turns, then the user turn: each reference
    image with its caption ("This is <chelsea>."), the row's images, the question text. `image_parts`
    holds one part per image of `req.all_images()`, in that order; each engine says how an image is
    given (a placeholder, a data URL)."""
    n_ref = len(req.references)
    content: list[dict] = []
    for part, (_, caption) in zip(image_parts[:n_ref], req.references):
        content += [part, {"type": "text", "text": caption}]
    content += list(image_parts[n_ref:]) + [{"type": "text", "text": req.user_prompt}]
    return ([{"role": "system", "content": req.system_prompt}]
            + [{"role": role, "content": text} for role, text in req.history]
            + [{"role": "user", "content": content}])


def prefix_regex(prefix: Union[str, Sequence[str]]) -> str:
    """Structured output that forces only the beginning of the answer (one prefix, or one of
    several: a multi-concept answer starts with any of its tags); the rest is free text bounded by
    max_tokens (a pattern that restricts the wording would cripple real answers)."""
    if isinstance(prefix, str):
        return re.escape(prefix) + r"[\s\S]*"
    return "(?:" + "|".join(re.escape(p) for p in prefix) + r")[\s\S]*"


# kind -> "module:factory"; adding an engine is one file plus one line here.
ENGINE_FACTORIES = {
    "vllm": "persqa_ray.engines.vllm_engine:build",
    "openai": "persqa_ray.engines.openai_engine:OpenAIEngine",
    "standin": "persqa_ray.engines.standin:StandInEngine",  # benchmark instrument only
}


@dataclass(frozen=True)
class EngineSpec:
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Engine:
        module, name = ENGINE_FACTORIES[self.kind].split(":")
        return getattr(importlib.import_module(module), name)(**self.options)
