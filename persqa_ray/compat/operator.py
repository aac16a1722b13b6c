"""`PersQAGenerate` (alias `PersQAGenerator`): DataFlow-MM's personalized image-QA operator.

A thin face: `plan()` builds the options from the same config the CLI uses, the rows are
normalized as the read stage does (`normalize_row`), and then the pipeline's own stage list runs
(`pipeline/stage_list.py`: items, decode, generate with validation, retries and the `pers_qa`
text) in this process, or through Ray Data (`build_dataset`, the same list) for large inputs. No
logic of the pipeline is copied here.

What it keeps from the seed: the subject is named `<mam>`, a question comes from templates, the
model is asked to begin with the name, many images go in one batch. What it fixes: the tag and the
seed can be set (the draw is seeded per row); answers are checked to start with the tag (forced by
structured output with our serving); a multi-image row is one prompt and one QA; a row whose
image fails keeps its columns with the output key null and `status`/`error` set; an existing
column under the output key is replaced (with a warning) instead of raising; when the input already
has `status` / `error` columns they are kept and ours are written as `<output_key>_status` /
`<output_key>_error` (with a warning).

Follows DataFlow-MM at OpenDCAI/DataFlow-MM a5d48e0 (2026-03-10): `PersQAGenerator.run(storage,
input_modal_key="image", output_key="output")` and `get_desc(lang)` as its source has them, and the
English documentation's `PersQAGenerate.run(storage, multi_modal_key="image", output_key="pers_qa")`;
`run` returns `[output_key]`, as DataFlow-MM's operators do.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from persqa_ray.compat.serving import APIVLMServing_openai, LLMServingABC, LocalModelVLMServing_vllm
from persqa_ray.engines.base import GenerationRequest, GenerationResult, SyncEngine, chat_messages
from persqa_ray.io.readers import normalize_row, rows_to_table
from persqa_ray.pipeline import Plan, build_dataset, plan
from persqa_ray.pipeline.executors import in_process
from persqa_ray.pipeline.stage_list import stage_list

log = logging.getLogger(__name__)
NO_PATH = "dataflow-storage"  # row-id source for storages that do not say which file they read


class _ServingEngine(SyncEngine):
    """Adapts a user's own LLMServingABC object to our engine protocol (no structured output:
    answers are still validated and re-asked; its failures stay per request)."""

    def __init__(self, serving: Any):
        self.serving = serving
        self.model_name = str(getattr(serving, "model_name", type(serving).__name__))

    def _prompt(self, req: GenerationRequest) -> str:
        messages = chat_messages(req, [{"type": "image"} for _ in req.all_images()])
        processor = getattr(self.serving, "processor", None)
        if processor is not None and hasattr(processor, "apply_chat_template"):
            return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{req.system_prompt}\n{req.user_prompt}"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        try:
            texts = self.serving.generate_from_input([self._prompt(r) for r in requests],
                                                     system_prompt=requests[0].system_prompt,
                                                     image_inputs=[r.all_images() for r in requests])
        except Exception as e:  # noqa: BLE001
            return [GenerationResult(None, error=f"{type(e).__name__}: {e}") for _ in requests]
        return [GenerationResult(text=t) for t in texts]


_DESC = {
    "zh": ("该算子调用视觉语言大模型（vLLM，或 OpenAI 兼容的服务）生成个性化图像问答（persqa_ray 实现）。\n\n"
           "输入参数：\n  - multi_modal_key / input_modal_key: 图像字段名（默认 'image'，可为路径或路径列表）\n"
           "  - output_key: 输出问答字段名（PersQAGenerate 默认 'pers_qa'，PersQAGenerator 默认 'output'）\n"
           "输出参数：\n  - output_key: 'Question: ... Answer: ...' 格式的问答文本（失败行为 null）\n"
           "  - status / error: 每行的状态码与原因\n"
           "功能特点：\n  - 主体名称标签（默认 '<mam>'）；结构化输出保证回答以标签开头\n"
           "  - 问题由带种子的随机数从模板中抽取，可复现\n  - 回答经过校验，不合格则重新生成\n"
           "  - 多图行作为一个提示；坏图得到错误码，不会丢行\n"),
    "en": ("This operator calls a vision-language model (vLLM, or an OpenAI-compatible server) to generate "
           "personalized image QA pairs (persqa_ray's implementation).\n\n"
           "Input Parameters:\n  - multi_modal_key / input_modal_key: image field name (default: 'image'; a path or a "
           "list of paths)\n  - output_key: output QA field name (default: 'pers_qa' for PersQAGenerate, 'output' for "
           "PersQAGenerator)\nOutput Parameters:\n  - output_key: the QA text, 'Question: ... Answer: ...' (null for "
           "a failed row)\n  - status / error: each row's status code and reason\n"
           "Features:\n  - the subject is named with a tag (default '<mam>'); structured output makes every "
           "answer start with it\n  - questions are drawn from templates by a seeded RNG: reruns reproduce them\n"
           "  - answers are validated and re-asked when they fail\n"
           "  - a multi-image row is one prompt; a bad image gets an error code, no row is lost\n"),
}


def _records(storage) -> list[dict]:
    """Rows exactly as stored: our FileStorage gives dicts (a DataFrame would invent NaN for keys
    a row lacks); other storages give a DataFrame, whose NaN we turn back into None."""
    from persqa_ray.compat.storage import FileStorage
    if isinstance(storage, FileStorage):
        return storage.read("dict")
    data = storage.read("dataframe")
    if not hasattr(data, "to_dict"):
        return list(data)
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
            for r in data.to_dict("records")]


class PersQAGenerate:
    def __init__(self, llm_serving: LLMServingABC, *, tag: str = "mam", seed: int = 0,
                 questions_per_image: int = 1, language: str = "en",
                 pers_qa_format: Optional[str] = None,
                 max_pixels: Optional[int] = None, allowed_roots: Optional[list[str]] = None,
                 max_retries: int = 2, execution: str = "auto", ray_threshold_rows: int = 20000):
        """Extra keyword arguments (all optional, defaults = the seed's behaviour plus fixes):
        `tag`, `seed`, `questions_per_image`, `language`, `pers_qa_format`, `max_pixels`,
        `allowed_roots`, `max_retries`; `execution`: 'local' (this process), 'ray' (Ray Data,
        one engine per actor), or 'auto' = 'ray' above `ray_threshold_rows` input rows when the
        storage reads a file and the serving is ours."""
        if execution not in ("auto", "local", "ray"):
            raise ValueError("execution must be 'auto', 'local' or 'ray'")
        self.serving = llm_serving
        self.options = dict(tag=tag, seed=seed, questions_per_image=questions_per_image, language=language,
                            pers_qa_format=pers_qa_format, max_pixels=max_pixels, allowed_roots=allowed_roots,
                            max_retries=max_retries)
        self.execution = execution
        self.ray_threshold_rows = ray_threshold_rows

    # -- configuration: the same PersQAConfig the CLI uses --------------------------------------
    def _config(self, path: str, image_column: str) -> dict:
        o = self.options
        ours = isinstance(self.serving, LocalModelVLMServing_vllm)
        engine: dict[str, Any] = {"kind": "vllm", "max_retries": o["max_retries"], "guided_prefix": ours}
        if isinstance(self.serving, APIVLMServing_openai):
            s = self.serving.options
            engine.update(kind="openai", model=s["model"], base_url=s["base_url"], api_key_env=s["api_key_env"],
                          max_concurrency=s["max_concurrency"], request_timeout_s=s["request_timeout_s"],
                          max_attempts=s["max_attempts"], structured=s["structured"],
                          guided_prefix=s["structured"] == "vllm", batch_size=self.serving.batch_size,
                          **{k: s[k] for k in ("max_tokens", "temperature", "top_p") if s[k] is not None})
        elif ours:
            s = self.serving.options
            engine.update(model=s["model"], tensor_parallel_size=s["tensor_parallel_size"],
                          max_model_len=s["max_model_len"], gpu_memory_utilization=s["gpu_memory_utilization"],
                          enforce_eager=s["enforce_eager"], max_images_per_prompt=s["max_images_per_prompt"],
                          max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                          top_k=s["top_k"], repetition_penalty=s["repetition_penalty"],
                          engine_kwargs=s["engine_kwargs"], batch_size=self.serving.batch_size)
        else:
            engine["model"] = str(getattr(self.serving, "model_name", type(self.serving).__name__))
        cfg = {"input": {"path": path, "image_column": image_column, "paths_relative_to": "cwd"},
               "prompt": {"tag": o["tag"], "seed": o["seed"], "questions_per_image": o["questions_per_image"],
                          "language": o["language"]},
               "engine": engine,
               "output": {"path": "unused", "pers_qa_format": o["pers_qa_format"]}}
        if o["max_pixels"]:
            cfg["image"] = {"max_pixels": o["max_pixels"]}
        if o["allowed_roots"]:
            cfg["input"]["allowed_roots"] = list(o["allowed_roots"])
        return cfg

    # -- the two ways to run the same stages -----------------------------------------------------
    def _local(self, p: Plan, path: str, records: list) -> list[dict]:
        table = rows_to_table([normalize_row(r, path, i, p.read) for i, r in enumerate(records)])
        engine = self.serving.engine if isinstance(self.serving, (LocalModelVLMServing_vllm, APIVLMServing_openai)) \
            else _ServingEngine(self.serving)
        return in_process(stage_list(p), table, replace={"generate": {"engine": engine}}).to_pylist()

    def _ray(self, p: Plan) -> list[dict]:
        return list(build_dataset(p.config, _plan=p).iter_rows())

    @staticmethod
    def get_desc(lang: str = "zh") -> str:
        """The operator's description, as DataFlow-MM operators give it ('zh' or 'en')."""
        return _DESC.get(lang, "PersQAGenerate produces personalized question-answer pairs for images "
                               "with character focus.")

    def run(self, storage, multi_modal_key: str = "image", output_key: str = "pers_qa",
            input_modal_key: Optional[str] = None) -> list[str]:
        return self._run(storage, input_modal_key or multi_modal_key, output_key)

    def _run(self, storage, image_column: str, output_key: str) -> list[str]:
        if not output_key:
            raise ValueError("'output_key' must be a non-empty string.")
        records = _records(storage)
        path = getattr(storage, "read_path", None) or NO_PATH
        fmt = "parquet" if str(path).endswith(".parquet") else "jsonl"
        p = plan(self._config(path, image_column), shards=[(path, fmt)])
        use_ray = self.execution == "ray" or (
            self.execution == "auto" and len(records) > self.ray_threshold_rows and path != NO_PATH
            and isinstance(self.serving, LocalModelVLMServing_vllm))
        results = self._ray(p) if use_ray else self._local(p, path, records)
        storage.write(_merge(records, results, p, path, output_key))
        return [output_key]


def _merge(records: list[dict], results: list[dict], p: Plan, path: str, output_key: str) -> list[dict]:
    """The user's rows, each followed by its QA text (k > 1: one row per QA pair) and status."""
    index = {normalize_row({}, path, i, p.read)["row_id"]: i for i in range(len(records))}
    keys = set().union(*records) if records else set()
    if output_key in keys:
        log.warning("input rows already have a %r column; it is replaced by the generated text", output_key)
    status_key, error_key, qa_key = (f"{output_key}_{k}" if k in keys else k for k in ("status", "error", "qa_index"))
    if status_key != "status" or error_key != "error":
        log.warning("input rows already have status/error columns; they are kept, ours are %r and %r",
                    status_key, error_key)
    k = p.config.prompt.questions_per_image
    out_rows = []
    for res in sorted(results, key=lambda r: (index[r["row_id"]], r["qa_index"])):
        row = dict(records[index[res["row_id"]]])
        row[output_key] = res["pers_qa"]
        if k > 1:
            row[qa_key] = res["qa_index"]
        row[status_key], row[error_key] = res["status"], res["error"]
        out_rows.append(row)
    return out_rows


class PersQAGenerator(PersQAGenerate):
    """DataFlow-MM's current name (and the Chinese documentation's) for the same operator: its
    `run` takes `input_modal_key` and defaults `output_key` to "output", as DataFlow-MM's does."""

    def run(self, storage, input_modal_key: str = "image", output_key: str = "output",
            multi_modal_key: Optional[str] = None) -> list[str]:
        return self._run(storage, multi_modal_key or input_modal_key, output_key)
