"""A benchmark instrument, not an engine: answers every request instantly with fixed text.

`engine.kind: standin` measures the pipeline's own cost (read, decode, requests, validation,
write) with no model at all: rows/s per CPU core tells how many cores one GPU engine needs.
Never use it to build a dataset: every answer is the same sentence.
"""
from __future__ import annotations

from typing import Sequence

from persqa_ray.engines.base import AsyncEngine, GenerationRequest, GenerationResult


class StandInEngine(AsyncEngine):
    def __init__(self, model: str = "standin", max_tokens: int = 16):
        self.model_name = model
        self.words = max(1, max_tokens)

    def _answer(self, req: GenerationRequest) -> GenerationResult:
        if req.choices:
            return GenerationResult(text=req.choices[0], num_input_tokens=len(req.user_prompt.split()),
                                    num_output_tokens=1)
        prefix = req.answer_prefix or "<mam>"
        return GenerationResult(text=f"{prefix} " + " ".join(["word"] * self.words),
                                num_input_tokens=len(req.user_prompt.split()), num_output_tokens=self.words)

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return [self._answer(r) for r in requests]
