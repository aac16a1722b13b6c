"""The engine protocol: requests in, results out, in order. One file per implementation.

The pipeline holds an `EngineSpec` (small, picklable) and builds the real engine inside the
actor that uses it, once (Daft's provider pattern): nothing heavy crosses the wire.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import numpy as np


@dataclass
class GenerationRequest:
    system_prompt: str
    user_prompt: str
    images: list[np.ndarray]          # RGB uint8 HxWx3, already at the model's size
    seed: Optional[int] = None        # per-request sampling seed (reproducible reruns)
    answer_prefix: Optional[str] = None  # structured output: the answer must begin with this
    prompt: Optional[str] = None      # an already chat-templated prompt (used as is when set)
    choices: Optional[tuple[str, ...]] = None  # structured output: the answer is exactly one of these
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, text) turns of a conversation, oldest first


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
        """One result per request, in the same order; per-request failures go in `error`.
        (Engines built for in-flight batching implement `async agenerate` with the same contract.)"""

    def shutdown(self) -> None:
        """Release the engine (processes, memory)."""


def chat_messages(req: GenerationRequest, image_parts: list[dict]) -> list[dict]:
    """The turns every engine sends: system, any earlier turns, then the user turn with the row's
    image parts and the question text. Each engine says how an image is given (a placeholder, a
    data URL)."""
    content = list(image_parts) + [{"type": "text", "text": req.user_prompt}]
    return ([{"role": "system", "content": req.system_prompt}]
            + [{"role": role, "content": text} for role, text in req.history]
            + [{"role": "user", "content": content}])


def prefix_regex(prefix: str) -> str:
    """Structured output that forces only the beginning of the answer; the rest is free text
    bounded by max_tokens (a pattern that restricts the wording would cripple real answers)."""
    return re.escape(prefix) + r"[\s\S]*"


# kind -> "module:factory"; adding an engine is one file plus one line here.
ENGINE_FACTORIES = {
    "vllm": "persqa_ray.engines.vllm_engine:VLLMEngine",
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
