"""The engine protocol: requests in, results out, in order. One file per implementation.

The pipeline holds an `EngineSpec` (small, picklable) and builds the real engine inside the
actor that uses it, once (Daft's provider pattern): nothing heavy crosses the wire.
"""
from __future__ import annotations

import importlib
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


@dataclass
class GenerationResult:
    text: Optional[str]
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    error: Optional[str] = None       # engine-side failure for this request only


class Engine(Protocol):
    model_name: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in the same order; per-request failures go in `error`."""

    def shutdown(self) -> None:
        """Release the engine (processes, memory)."""


# kind -> "module:factory"; adding an engine is one file plus one line here.
ENGINE_FACTORIES = {
    "vllm": "persqa_ray.engines.vllm_engine:VLLMEngine",
}


@dataclass(frozen=True)
class EngineSpec:
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Engine:
        module, name = ENGINE_FACTORIES[self.kind].split(":")
        return getattr(importlib.import_module(module), name)(**self.options)
