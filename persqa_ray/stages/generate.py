"""Generate stage (engine actor pool): one engine per actor, built once; answers validated here.

Each input row that reached this stage with status ok leaves as exactly k QA rows, each `ok`,
`invalid_output` (failed validation after engine.max_retries re-asks with new seeds) or
`engine_error`. A row that failed earlier leaves as its one error row. Pixels are dropped here.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from persqa_ray import schema
from persqa_ray.engines.base import EngineSpec, GenerationRequest, GenerationResult
from persqa_ray.stages.validate import check_answer, format_pers_qa

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateOptions:
    engine: EngineSpec
    model_name: str
    system_prompt: str
    prompt_version: str
    seed: int
    pers_qa_format: str
    max_retries: int
    guided_prefix: bool
    max_engine_restarts: int = 3


def request_seed(seed: int, row_id: str, qa_index: int, attempt: int) -> int:
    h = hashlib.blake2b(f"{seed}:{row_id}:{qa_index}:{attempt}".encode(), digest_size=4)
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFF


def _images(pixels: list[bytes], shapes: list[list[int]]) -> list[np.ndarray]:
    # bytearray: one memcpy so the array is writable (torch.from_numpy in the processor warns on
    # read-only buffers); no decoding happens here.
    return [np.frombuffer(bytearray(p), dtype=np.uint8).reshape(h, w, 3) for p, (h, w) in zip(pixels, shapes)]


@dataclass
class _QA:
    src: int            # row index in the input batch
    qa_index: int
    question: Optional[str]
    template_id: Optional[str]
    prompt: Optional[str]
    status: str
    error: Optional[str]
    answer: Optional[str] = None
    attempts: int = 0
    in_tokens: int = 0
    out_tokens: int = 0
    latency: float = 0.0


class _Work:
    """One batch's QA rows and the requests still to (re)ask: the logic both stages share."""

    def __init__(self, batch: pa.Table, opts: GenerateOptions):
        self.opts = opts
        self.cols = {name: batch.column(name).to_pylist() for name in
                     ("row_id", "status", "error", "tag", schema.QUESTIONS, schema.TEMPLATE_IDS, schema.PROMPTS)}
        pixels = batch.column(schema.PIXELS).to_pylist()
        shapes = batch.column(schema.SHAPES).to_pylist()
        self.qas: list[_QA] = []
        self.images: dict[int, list[np.ndarray]] = {}
        for i, status in enumerate(self.cols["status"]):
            if status != schema.OK:
                self.qas.append(_QA(i, 0, None, None, None, status, self.cols["error"][i]))
                continue
            self.images[i] = _images(pixels[i], shapes[i])
            for k, (q, t, p) in enumerate(zip(self.cols[schema.QUESTIONS][i], self.cols[schema.TEMPLATE_IDS][i],
                                              self.cols[schema.PROMPTS][i])):
                self.qas.append(_QA(i, k, q, t, p, schema.ENGINE_ERROR, "not generated"))
        self.pending = [qa for qa in self.qas if qa.prompt is not None]

    def requests(self, attempt: int) -> list[GenerationRequest]:
        o = self.opts
        return [GenerationRequest(
            system_prompt=o.system_prompt, user_prompt=qa.prompt, images=self.images[qa.src],
            seed=request_seed(o.seed, self.cols["row_id"][qa.src], qa.qa_index, attempt),
            answer_prefix=self.cols["tag"][qa.src] if o.guided_prefix else None) for qa in self.pending]

    def apply(self, attempt: int, results: list[GenerationResult]) -> None:
        retry = []
        for qa, res in zip(self.pending, results):
            qa.attempts = attempt + 1
            qa.in_tokens += res.num_input_tokens
            qa.out_tokens += res.num_output_tokens
            qa.latency += res.latency_s
            if res.error:
                qa.status, qa.error = schema.ENGINE_ERROR, res.error
                retry.append(qa)
                continue
            answer, reason = check_answer(res.text, self.cols["tag"][qa.src])
            if answer is None:
                qa.status, qa.error = schema.INVALID_OUTPUT, reason
                retry.append(qa)
            else:
                qa.status, qa.error, qa.answer = schema.OK, None, answer
        self.pending = retry


class _StageBase:
    def __init__(self, opts: GenerateOptions, stats: Any = None, engine: Any = None):
        self.opts = opts
        self.stats = stats
        self.engine_restarts = 0
        # `engine`: an already running engine (the DataFlow-style API and tests share one);
        # otherwise the actor builds its own from the spec, once.
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else opts.engine.build()

    def _alive(self) -> bool:
        return getattr(self.engine, "alive", lambda: True)()

    def _restart_engine(self) -> None:
        self.engine_restarts += 1
        log.warning("engine died; recreating it (restart %d)", self.engine_restarts)
        try:
            self.engine.shutdown()
        except Exception:  # noqa: BLE001
            pass
        self.engine = self.opts.engine.build()
        if self.stats is not None:
            self.stats.add.remote("engine_restarts", 1)

    def _can_restart(self, results: list[GenerationResult]) -> bool:
        return (any(r.error for r in results) and not self._alive()
                and self.engine_restarts < self.opts.max_engine_restarts)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None and getattr(self, "_owns_engine", False):
            engine.shutdown()


class GenerateStage(_StageBase):
    """Offline engine API: one engine call per batch at a time."""

    def _run(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        results = self.engine.generate(reqs)
        if self._can_restart(results):
            self._restart_engine()
            results = self.engine.generate(reqs)
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        work = _Work(batch, self.opts)
        for attempt in range(self.opts.max_retries + 1):
            if not work.pending:
                break
            work.apply(attempt, self._run(work.requests(attempt)))
        return _to_table(batch, work.qas, self.opts)


class AsyncGenerateStage(_StageBase):
    """Async engine: Ray Data calls this concurrently (several batches in flight per actor);
    each request is submitted at once and its result lands in its own row."""

    def __init__(self, opts: GenerateOptions, stats: Any = None, engine: Any = None):
        super().__init__(opts, stats, engine)
        self.in_flight = 0
        self.max_in_flight = 0
        self._restart_lock = None

    async def _run(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        import asyncio
        if self._restart_lock is None:
            self._restart_lock = asyncio.Lock()
        engine = self.engine
        results = await engine.agenerate(reqs)
        if any(r.error for r in results) and not engine.alive():
            async with self._restart_lock:  # concurrent batches all see the death: restart once
                if self.engine is engine and self.engine_restarts < self.opts.max_engine_restarts:
                    self._restart_engine()
            if self.engine is not engine:
                results = await self.engine.agenerate(reqs)
        return results

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
            if self.stats is not None:
                self.stats.record_max.remote("max_batches_in_flight", self.max_in_flight)
        try:
            work = _Work(batch, self.opts)
            for attempt in range(self.opts.max_retries + 1):
                if not work.pending:
                    break
                work.apply(attempt, await self._run(work.requests(attempt)))
            return _to_table(batch, work.qas, self.opts)
        finally:
            self.in_flight -= 1


def _to_table(batch: pa.Table, qas: list[_QA], o: GenerateOptions) -> pa.Table:
    keep = [n for n in batch.column_names
            if n not in schema.OUTPUT_COLUMNS and not n.startswith(schema.INTERNAL_PREFIX)]
    out = batch.select(keep).take(pa.array([qa.src for qa in qas], pa.int64()))
    src = {n: batch.column(n).to_pylist() for n in ("row_id", "concept", "tag", "subject_type", "language")}
    values = {
        "row_id": [src["row_id"][qa.src] for qa in qas],
        "qa_index": [qa.qa_index for qa in qas],
        "concept": [src["concept"][qa.src] for qa in qas],
        "tag": [src["tag"][qa.src] for qa in qas],
        "subject_type": [src["subject_type"][qa.src] for qa in qas],
        "question": [qa.question for qa in qas],
        "answer": [qa.answer for qa in qas],
        "pers_qa": [format_pers_qa(o.pers_qa_format, qa.question, qa.answer) if qa.answer else None
                    for qa in qas],
        "template_id": [qa.template_id for qa in qas],
        "language": [src["language"][qa.src] for qa in qas],
        "status": [qa.status for qa in qas],
        "error": [qa.error for qa in qas],
        "model": [o.model_name] * len(qas),
        "seed": [o.seed] * len(qas),
        "prompt_version": [o.prompt_version] * len(qas),
        "num_input_tokens": [qa.in_tokens for qa in qas],
        "num_output_tokens": [qa.out_tokens for qa in qas],
        "attempts": [qa.attempts for qa in qas],
        "latency_s": [round(qa.latency, 4) for qa in qas],
    }
    arrays = {f.name: pa.array(values[f.name], f.type) for f in schema.OUTPUT_FIELDS}
    names = ["row_id", "qa_index"] + keep + [f.name for f in schema.OUTPUT_FIELDS[2:]]
    cols = [arrays[n] if n in arrays else out.column(n) for n in names]
    return pa.Table.from_arrays(cols, names=names)

