"""One batch's QA rows and the engine rounds they need (the generate stage's bookkeeping).

`BatchWork.rounds()` is a generator: it yields a list of requests and is sent their results, so
the stage only drives the engine. The rounds: subject detection for rows whose type the VLM
decides, then answers, re-asked with new seeds while the answer policy refuses them (recognition
checks ride along in the first round). Every decision about what is asked and what is kept comes
from `personalization/`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from persqa_ray import schema
from persqa_ray.engines.base import GenerationRequest, GenerationResult
from persqa_ray.personalization.answers import accept_answer, check_label, check_request, format_pers_qa
from persqa_ray.personalization.items import ASKED, RECOGNITION, items_after_detection
from persqa_ray.personalization.options import PersonalizationOptions
from persqa_ray.personalization.subjects import classify_request, detected_subject


def request_seed(seed: int, row_id: str, qa_index: int, attempt: int) -> int:
    h = hashlib.blake2b(f"{seed}:{row_id}:{qa_index}:{attempt}".encode(), digest_size=4)
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFF


def _images(pixels: list[bytes], shapes: list[list[int]]) -> list[np.ndarray]:
    # bytearray: one memcpy so the array is writable (torch.from_numpy in the processor warns on
    # read-only buffers); no decoding happens here.
    return [np.frombuffer(bytearray(p), dtype=np.uint8).reshape(h, w, 3) for p, (h, w) in zip(pixels, shapes)]


@dataclass
class QA:
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


class BatchWork:
    def __init__(self, batch: pa.Table, pers: PersonalizationOptions, seed: int, guided_prefix: bool,
                 max_retries: int, references: Any = None):
        self.pers, self.seed, self.guided, self.max_retries = pers, seed, guided_prefix, max_retries
        self.cols = {name: batch.column(name).to_pylist() for name in
                     ("row_id", "status", "error", "concept", "tag", "image_concepts", "subject_type",
                      "subject_type_source", schema.ITEMS, schema.DETECT, schema.REF_IMAGES, schema.REF_CAPTIONS)}
        pixels = batch.column(schema.PIXELS).to_pylist()
        shapes = batch.column(schema.SHAPES).to_pylist()
        self.refs = self._references(references)
        self.images = {i: _images(pixels[i], shapes[i])
                       for i, status in enumerate(self.cols["status"]) if status == schema.OK}
        self.detect_usage: dict[int, GenerationResult] = {}
        self.qas: list[QA] = []

    def _references(self, loader) -> dict[int, tuple]:
        """Each ok row's (image, caption) references, decoded by the stage's cache; a row whose
        reference cannot be read becomes one bad_reference_image error row."""
        from persqa_ray.stages.decode import ImageFailure
        c, out = self.cols, {}
        for i, paths in enumerate(c[schema.REF_IMAGES]):
            if c["status"][i] != schema.OK or not paths:
                continue
            try:
                out[i] = tuple((loader.get(p), cap) for p, cap in zip(paths, c[schema.REF_CAPTIONS][i]))
            except ImageFailure as e:
                c["status"][i], c["error"][i] = schema.BAD_REFERENCE, f"reference image: {e}"
        return out

    def _seed(self, i: int, qa_index: int, attempt: int = 0) -> int:
        return request_seed(self.seed, self.cols["row_id"][i], qa_index, attempt)

    def _apply_detection(self, rows: list[int], results: list[GenerationResult]) -> None:
        c = self.cols
        for i, res in zip(rows, results):
            self.detect_usage[i] = res
            subject = detected_subject(self.pers, c["row_id"][i], res)
            c["subject_type"][i], c["subject_type_source"][i] = subject.type, subject.source
            c[schema.ITEMS][i] = items_after_detection(self.pers, c["row_id"][i], c["concept"][i], subject,
                                                       c[schema.ITEMS][i])

    def _build_qas(self) -> None:
        for i, status in enumerate(self.cols["status"]):
            if status != schema.OK:
                self.qas.append(QA(i, 0, None, status, self.cols["error"][i]))
                continue
            for k, item in enumerate(self.cols[schema.ITEMS][i]):
                if item["qa_type"] == RECOGNITION:  # the answer is built from the label
                    qa = QA(i, k, item, schema.OK, None, answer=item["answer"])
                else:
                    qa = QA(i, k, item, schema.ENGINE_ERROR, "not generated")
                if k == 0 and i in self.detect_usage:
                    qa.add_usage(self.detect_usage[i])  # detection tokens count against the row
                self.qas.append(qa)

    def _answer_request(self, qa: QA, attempt: int) -> GenerationRequest:
        it = qa.item
        prefix = it["prefix"] or tuple(it["tags"] or ()) or None  # a multi-concept answer: one of its tags
        return GenerationRequest(system_prompt=it["system"], user_prompt=it["prompt"], images=self.images[qa.src],
                                 seed=self._seed(qa.src, qa.qa_index, attempt), references=self.refs.get(qa.src, ()),
                                 answer_prefix=prefix if self.guided else None)

    def _apply_answer(self, qa: QA, attempt: int, res: GenerationResult) -> bool:
        """Record one answer; True if it must be asked again."""
        qa.attempts = attempt + 1
        qa.add_usage(res)
        if res.error:
            qa.status, qa.error = schema.ENGINE_ERROR, res.error
            return True
        answer, reason = accept_answer(self.pers, qa.item, res.text)
        if answer is None:
            qa.status, qa.error = schema.INVALID_OUTPUT, reason
            return True
        qa.status, qa.error, qa.answer = schema.OK, None, answer
        return False

    def rounds(self):
        detect = [i for i in self.images if self.cols[schema.DETECT][i]]
        if detect:
            requests = [classify_request(self.pers, self.images[i], self._seed(i, -1)) for i in detect]
            self._apply_detection(detect, (yield requests))
        self._build_qas()
        pending = [qa for qa in self.qas if qa.item is not None and qa.item["qa_type"] in ASKED]
        checks = [qa for qa in self.qas if qa.item is not None and qa.item["check"]]
        for attempt in range(self.max_retries + 1):
            asked = checks if attempt == 0 else []
            if not pending and not asked:
                break
            results = yield [self._answer_request(qa, attempt) for qa in pending] + \
                [check_request(self.pers, qa.item, self.images[qa.src], self._seed(qa.src, qa.qa_index))
                 for qa in asked]
            for qa, res in zip(asked, results[len(pending):]):
                qa.add_usage(res)
                qa.model_label = check_label(self.pers, res.text)
            pending = [qa for qa, res in zip(pending, results) if self._apply_answer(qa, attempt, res)]

    def table(self, batch: pa.Table, constants: dict[str, Any], pers_qa_format: str) -> pa.Table:
        """The batch's output rows: one per QA (or per failed row), input columns kept."""
        keep = [n for n in batch.column_names if n in schema.WRITER_COLUMNS or
                (n not in schema.OUTPUT_COLUMNS and not n.startswith(schema.INTERNAL_PREFIX))]
        out = batch.select(keep).take(pa.array([qa.src for qa in self.qas], pa.int64()))
        values = self._values(pers_qa_format)
        n = len(self.qas)
        values.update({k: [v] * n for k, v in constants.items()})
        arrays = {f.name: pa.array(values[f.name], f.type) for f in schema.OUTPUT_FIELDS}
        names = ["row_id", "qa_index"] + keep + [f.name for f in schema.OUTPUT_FIELDS[2:]]
        return pa.Table.from_arrays([arrays[n] if n in arrays else out.column(n) for n in names], names=names)

    def _values(self, pers_qa_format: str) -> dict[str, list]:
        c, qas = self.cols, self.qas
        item = (lambda qa, key, default=None: qa.item[key] if qa.item is not None else default)
        return {
            "row_id": [c["row_id"][qa.src] for qa in qas],
            "qa_index": [qa.qa_index for qa in qas],
            "qa_type": [item(qa, "qa_type") for qa in qas],
            "concept": [item(qa, "concept", c["concept"][qa.src]) for qa in qas],
            "tag": [item(qa, "tag", c["tag"][qa.src]) for qa in qas],
            "image_concept": [c["concept"][qa.src] for qa in qas],
            "image_concepts": [c["image_concepts"][qa.src] for qa in qas],
            "reference_images": [c[schema.REF_IMAGES][qa.src] or [] for qa in qas],
            "subject_type": [c["subject_type"][qa.src] for qa in qas],
            "subject_type_source": [c["subject_type_source"][qa.src] for qa in qas],
            "question": [item(qa, "question") for qa in qas],
            "answer": [qa.answer for qa in qas],
            "pers_qa": [format_pers_qa(pers_qa_format, qa.item["question"], qa.answer) if qa.answer else None
                        for qa in qas],
            "template_id": [item(qa, "template_id") for qa in qas],
            "label": [item(qa, "label") for qa in qas],
            "negative_concept": [qa.item["concept"] if qa.item and qa.item["label"] == "no" else None for qa in qas],
            "negative_kind": [item(qa, "negative_kind") for qa in qas],
            "model_label": [qa.model_label for qa in qas],
            "status": [qa.status for qa in qas],
            "error": [qa.error for qa in qas],
            "num_input_tokens": [qa.in_tokens for qa in qas],
            "num_output_tokens": [qa.out_tokens for qa in qas],
            "attempts": [qa.attempts for qa in qas],
            "latency_s": [round(qa.latency, 4) for qa in qas],
        }
