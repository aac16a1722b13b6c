"""Generate stage (engine actor pool): one engine per actor, built once; answers validated here.

Each input row that reached this stage with status ok leaves as one QA row per item (k open
questions, plus recognition pairs), each `ok`, `invalid_output` (failed validation after
engine.max_retries re-asks with new seeds) or `engine_error`. A row that failed earlier leaves as
its one error row. Rows whose subject type is unknown ask the VLM first. Pixels are dropped here.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from persqa_ray import schema
from persqa_ray.engines.base import EngineSpec, GenerationRequest, GenerationResult
from persqa_ray.stages.requests import OPEN, RECOGNITION, RequestOptions, open_items
from persqa_ray.stages.validate import check_answer, format_pers_qa, substitute_phrase

log = logging.getLogger(__name__)
MAX_ACTOR_EXITS = 3  # engine actors that may give up in one run before the run fails


@dataclass(frozen=True)
class GenerateOptions:
    engine: EngineSpec
    model_name: str
    requests: RequestOptions   # prompts for subject detection, and open items of detected rows
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
    src: int                      # row index in the input batch
    qa_index: int
    item: Optional[dict]          # None: the row failed before generation
    status: str
    error: Optional[str]
    answer: Optional[str] = None
    model_label: Optional[str] = None
    attempts: int = 0
    in_tokens: int = 0
    out_tokens: int = 0
    latency: float = 0.0

    def add_usage(self, res: GenerationResult) -> None:
        self.in_tokens += res.num_input_tokens
        self.out_tokens += res.num_output_tokens
        self.latency += res.latency_s


class _Work:
    """One batch's QA rows and the engine rounds they need: the logic both stages share.

    `rounds()` is a generator: it yields a list of requests and is sent their results, so the
    sync and the async stage drive the same sequence: subject detection (rows that need it),
    then answers with re-asks for invalid ones (plus recognition checks in the first round).
    """

    def __init__(self, batch: pa.Table, opts: GenerateOptions):
        self.opts = opts
        self.cols = {name: batch.column(name).to_pylist() for name in
                     ("row_id", "status", "error", "concept", "tag", "subject_type", "subject_type_source",
                      schema.ITEMS)}
        pixels = batch.column(schema.PIXELS).to_pylist()
        shapes = batch.column(schema.SHAPES).to_pylist()
        self.images = {i: _images(pixels[i], shapes[i])
                       for i, status in enumerate(self.cols["status"]) if status == schema.OK}
        self.detect_usage: dict[int, GenerationResult] = {}
        self.qas: list[_QA] = []

    # -- subject detection ------------------------------------------------------------------
    def _classify_requests(self, rows: list[int]) -> list[GenerationRequest]:
        ts = self.opts.requests.templates()
        return [GenerationRequest(system_prompt=ts.classify_system_prompt, user_prompt=ts.classify_user_prompt,
                                  images=self.images[i], choices=tuple(ts.classify_labels.values()),
                                  seed=request_seed(self.opts.seed, self.cols["row_id"][i], -1, 0)) for i in rows]

    def _apply_detection(self, rows: list[int], results: list[GenerationResult]) -> None:
        o = self.opts.requests
        by_label = {label.lower(): st for st, label in o.templates().classify_labels.items()}
        for i, res in zip(rows, results):
            self.detect_usage[i] = res
            st = by_label.get((res.text or "").strip().lower()) if not res.error else None
            if st is None:
                log.warning("subject detection failed for row %s (%s): using the default",
                            self.cols["row_id"][i], res.error or repr(res.text))
            source = "detected" if st else ("default" if o.default_subject_type else "unknown")
            st = st or o.default_subject_type
            concept, _ = o.registry.resolve(self.cols["concept"][i])
            self.cols["subject_type"][i], self.cols["subject_type_source"][i] = st, source
            self.cols[schema.ITEMS][i] = open_items(o, self.cols["row_id"][i], concept, st) + \
                list(self.cols[schema.ITEMS][i] or [])

    # -- QA rows ------------------------------------------------------------------------------
    def _build_qas(self) -> None:
        for i, status in enumerate(self.cols["status"]):
            if status != schema.OK:
                self.qas.append(_QA(i, 0, None, status, self.cols["error"][i]))
                continue
            for k, item in enumerate(self.cols[schema.ITEMS][i]):
                if item["qa_type"] == RECOGNITION:  # the answer is built from the label
                    qa = _QA(i, k, item, schema.OK, None, answer=item["answer"], attempts=0)
                else:
                    qa = _QA(i, k, item, schema.ENGINE_ERROR, "not generated")
                if k == 0 and i in self.detect_usage:
                    qa.add_usage(self.detect_usage[i])  # detection tokens count against the row
                self.qas.append(qa)

    def _answer_request(self, qa: _QA, attempt: int) -> GenerationRequest:
        it = qa.item
        return GenerationRequest(
            system_prompt=it["system"], user_prompt=it["prompt"], images=self.images[qa.src],
            seed=request_seed(self.opts.seed, self.cols["row_id"][qa.src], qa.qa_index, attempt),
            answer_prefix=it["prefix"] if self.opts.guided_prefix else None)

    def _check_request(self, qa: _QA) -> GenerationRequest:
        labels = self.opts.requests.templates().recognition.check_labels
        return GenerationRequest(system_prompt=qa.item["system"], user_prompt=qa.item["check"],
                                 images=self.images[qa.src], choices=(labels["yes"], labels["no"]),
                                 seed=request_seed(self.opts.seed, self.cols["row_id"][qa.src], qa.qa_index, 0))

    def _apply_answer(self, qa: _QA, attempt: int, res: GenerationResult) -> bool:
        """Record one answer; True if it must be asked again."""
        qa.attempts = attempt + 1
        qa.add_usage(res)
        if res.error:
            qa.status, qa.error = schema.ENGINE_ERROR, res.error
            return True
        it = qa.item
        if self.opts.requests.substitute:
            text = substitute_phrase(res.text, it["phrase"], it["tag"])
            answer, reason = check_answer(text, it["tag"], question=it["question"])
        else:
            answer, reason = check_answer(res.text, it["tag"], question=it["question"], class_phrase=it["phrase"])
        if answer is None:
            qa.status, qa.error = schema.INVALID_OUTPUT, reason
            return True
        qa.status, qa.error, qa.answer = schema.OK, None, answer
        return False

    def _apply_check(self, qa: _QA, res: GenerationResult) -> None:
        qa.add_usage(res)
        labels = self.opts.requests.templates().recognition.check_labels
        got = (res.text or "").strip().lower()
        qa.model_label = next((k for k, v in labels.items() if got == v.lower()), None)

    def rounds(self):
        detect = [i for i in self.images if self.cols["subject_type_source"][i] == "detect"]
        if detect:
            self._apply_detection(detect, (yield self._classify_requests(detect)))
        self._build_qas()
        pending = [qa for qa in self.qas if qa.item is not None and qa.item["qa_type"] == OPEN]
        checks = [qa for qa in self.qas if qa.item is not None and qa.item["check"]]
        for attempt in range(self.opts.max_retries + 1):
            asked = checks if attempt == 0 else []
            if not pending and not asked:
                break
            results = yield [self._answer_request(qa, attempt) for qa in pending] + \
                [self._check_request(qa) for qa in asked]
            for qa, res in zip(asked, results[len(pending):]):
                self._apply_check(qa, res)
            pending = [qa for qa, res in zip(pending, results) if self._apply_answer(qa, attempt, res)]

    def table(self, batch: pa.Table) -> pa.Table:
        return _to_table(batch, self.cols, self.qas, self.opts)


class _StageBase:
    def __init__(self, opts: GenerateOptions, stats: Any = None, engine: Any = None):
        self.opts = opts
        self.stats = stats
        self.engine_restarts = 0
        # `engine`: an already running engine (the DataFlow-style API and tests share one);
        # otherwise the actor builds its own from the spec, once.
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

    def _give_up_if_dead(self, results: list[GenerationResult]) -> None:
        """Restart budget spent and the engine still dead: this actor exits, so Ray replaces it
        and retries its batches on a fresh engine, instead of every later row becoming an
        engine_error answered by a dead engine. (A shared engine, from the DataFlow face or a
        test, is not ours to give up: its errors stay per row.)"""
        if not self._owns_engine or not any(r.error for r in results) or self._alive():
            return
        log.error("engine dead after %d restart(s) (engine.max_restarts): this actor exits for Ray to "
                  "replace it", self.engine_restarts)
        if self.stats is not None:
            import ray
            ray.get(self.stats.add.remote("engine_actor_exits", 1))
        os._exit(1)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None and getattr(self, "_owns_engine", False):
            engine.shutdown()
            if getattr(self, "_where", None) and self.stats is not None:
                # The driver waits for this before it exits (pipeline._wait_for_engine_actors).
                try:
                    import ray
                    ray.get(self.stats.actor_stopped.remote("generate", *self._where), timeout=5)
                except Exception:  # noqa: BLE001 - the run is over either way
                    pass


class GenerateStage(_StageBase):
    """Offline engine API: one engine call per batch at a time."""

    def _run(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        results = self.engine.generate(reqs)
        if self._can_restart(results):
            self._restart_engine()
            results = self.engine.generate(reqs)
        self._give_up_if_dead(results)
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        work = _Work(batch, self.opts)
        rounds = work.rounds()
        try:
            requests = next(rounds)
            while True:
                requests = rounds.send(self._run(requests))
        except StopIteration:
            pass
        return work.table(batch)


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
            self._give_up_if_dead(results)
        return results

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
            if self.stats is not None:
                self.stats.record_max.remote("max_batches_in_flight", self.max_in_flight)
        try:
            work = _Work(batch, self.opts)
            rounds = work.rounds()
            try:
                requests = next(rounds)
                while True:
                    requests = rounds.send(await self._run(requests))
            except StopIteration:
                pass
            return work.table(batch)
        finally:
            self.in_flight -= 1


def _to_table(batch: pa.Table, cols: dict[str, list], qas: list[_QA], o: GenerateOptions) -> pa.Table:
    keep = [n for n in batch.column_names if n in schema.WRITER_COLUMNS or
            (n not in schema.OUTPUT_COLUMNS and not n.startswith(schema.INTERNAL_PREFIX))]
    out = batch.select(keep).take(pa.array([qa.src for qa in qas], pa.int64()))
    item = (lambda qa, key, default=None: qa.item[key] if qa.item is not None else default)
    values = {
        "row_id": [cols["row_id"][qa.src] for qa in qas],
        "qa_index": [qa.qa_index for qa in qas],
        "qa_type": [item(qa, "qa_type") for qa in qas],
        "concept": [item(qa, "concept", cols["concept"][qa.src]) for qa in qas],
        "tag": [item(qa, "tag", cols["tag"][qa.src]) for qa in qas],
        "image_concept": [cols["concept"][qa.src] for qa in qas],
        "subject_type": [cols["subject_type"][qa.src] for qa in qas],
        "subject_type_source": [cols["subject_type_source"][qa.src] for qa in qas],
        "question": [item(qa, "question") for qa in qas],
        "answer": [qa.answer for qa in qas],
        "pers_qa": [format_pers_qa(o.pers_qa_format, qa.item["question"], qa.answer) if qa.answer else None
                    for qa in qas],
        "template_id": [item(qa, "template_id") for qa in qas],
        "label": [item(qa, "label") for qa in qas],
        "model_label": [qa.model_label for qa in qas],
        "language": [o.requests.language] * len(qas),
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
    cols_out = [arrays[n] if n in arrays else out.column(n) for n in names]
    return pa.Table.from_arrays(cols_out, names=names)
