"""DataFlow-style VLM servings over persqa_ray's own engines.

`LocalModelVLMServing_vllm` (our vLLM adapter, `engines/vllm_engine.py`) and `APIVLMServing_openai`
(our OpenAI-compatible engine, `engines/openai_engine.py`: bounded concurrency, retries with
backoff, `Retry-After`, a per-request timeout) take DataFlow-MM's constructor arguments
(OpenDCAI/DataFlow-MM a5d48e0, `dataflow/serving/`) and answer its two calls:
`generate_from_input(user_inputs, system_prompt, image_inputs)` and
`generate_from_input_messages(conversations, image_list, system_prompt)`. Images come in as paths
(or PIL images / arrays) and are decoded once, under the pipeline's size limits. A request that
fails (its image cannot be read, the engine gave up) answers "" and is logged with the reason.
"""
from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from typing import Any, Optional, Sequence

import numpy as np

from persqa_ray.engines.base import EngineSpec, GenerationRequest

log = logging.getLogger(__name__)
DEFAULT_SYSTEM = "You are a helpful assistant."


class LLMServingABC(ABC):
    """What an operator needs from a serving object (users' own servings subclass or duck-type it)."""

    @abstractmethod
    def generate_from_input(self, user_inputs: list[str], system_prompt: str = "",
                            image_inputs: Optional[list] = None) -> list[str]: ...

    def cleanup(self) -> None:  # noqa: B027 - optional hook
        pass


VLMServingABC = LLMServingABC  # DataFlow-MM's name for the same base


class ServingError(ValueError):
    """One request of a serving call could not be built (bad image, bad conversation)."""


def _decoder():
    """The pipeline's image decoder with its default size limits. The caller names its files
    itself (this is a library call, not a dataset row), so no root restricts local paths."""
    from persqa_ray.config import ImageConfig, InputConfig
    from persqa_ray.stages.decode import DecodeOptions, ImageDecoder
    i, d = ImageConfig(), InputConfig.model_fields
    return ImageDecoder(DecodeOptions(
        max_pixels=i.max_pixels, min_pixels=i.min_pixels, factor=i.resize_factor, max_aspect_ratio=i.max_aspect_ratio,
        max_decode_pixels=i.max_decode_pixels, max_image_bytes=d["max_image_bytes"].default, max_images=64,
        allowed_roots=(os.sep,), allowed_schemes=("file", "s3"), storage_options={}, formats=tuple(i.formats)))


def _as_array(image: Any, decoder) -> np.ndarray:
    """A path, PIL image or array -> RGB uint8 array (the engine's input form)."""
    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, (str, os.PathLike)):
        from persqa_ray.stages.decode import ImageFailure
        try:
            return decoder.decode(os.path.abspath(os.fspath(image)) if "://" not in str(image) else str(image))
        except ImageFailure as e:
            raise ServingError(f"{e.status}: {e}") from None
    return np.asarray(image.convert("RGB"))


def _image_lists(images: Optional[Sequence], n: int) -> list[list]:
    if images is None:
        return [[] for _ in range(n)]
    images = list(images)
    if len(images) != n:
        raise ValueError(f"{len(images)} image lists for {n} inputs")
    return [[] if x is None else ([x] if not isinstance(x, (list, tuple)) else [i for i in x if i is not None])
            for x in images]


_MEDIA_TOKEN = re.compile(r"<(image|video|audio)>")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _turn(turn: dict) -> tuple[str, str]:
    """(role, text) of one turn, DataFlow's {"from", "value"} or OpenAI's {"role", "content"}."""
    role = _ROLES.get(str(turn.get("from", turn.get("role", "user"))).lower())
    if role is None:
        raise ServingError(f"unknown role in turn {turn!r}")
    content = turn.get("value", turn.get("content", ""))
    if isinstance(content, list):  # OpenAI content parts: the text parts, in order
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return role, re.sub(r"\n+", "\n", _MEDIA_TOKEN.sub("", str(content))).strip()


def conversation_request(conversation: list[dict], images: list, system_prompt: str, decoder) -> GenerationRequest:
    """A conversation (its last turn the user's) as one request: the earlier turns are history,
    the row's images go with the last user turn (DataFlow's `<image>` tokens are dropped; every
    image given is shown, in order)."""
    turns = [_turn(t) for t in conversation if isinstance(t, dict)]
    system = next((text for role, text in turns if role == "system"), system_prompt)
    turns = [(r, t) for r, t in turns if r != "system"]
    if not turns or turns[-1][0] != "user":
        raise ServingError("a conversation must end with a user turn")
    return GenerationRequest(system_prompt=system, user_prompt=turns[-1][1], history=tuple(turns[:-1]),
                             images=[_as_array(x, decoder) for x in images])


class _Serving(LLMServingABC):
    """The two DataFlow calls over one of our engines, built lazily from `spec`."""

    batch_size = 64

    def __init__(self):
        self._engine = None
        self._decoder = None

    @property
    def spec(self) -> EngineSpec:
        raise NotImplementedError

    @property
    def engine(self):
        if self._engine is None:
            self._engine = self.spec.build()
        return self._engine

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = _decoder()
        return self._decoder

    def _request(self, prompt: str, images: list, system_prompt: str, i: int) -> GenerationRequest:
        raise NotImplementedError

    def _answer(self, builders: list) -> list[str]:
        """Build each request (a failure answers "" for that input only), generate in batches."""
        reqs: list[Optional[GenerationRequest]] = []
        for i, build in enumerate(builders):
            try:
                reqs.append(build())
            except ServingError as e:
                log.warning("input %d: %s (answered with '')", i, e)
                reqs.append(None)
        todo = [r for r in reqs if r is not None]
        texts = []
        for start in range(0, len(todo), self.batch_size):
            for r in self.engine.generate(todo[start:start + self.batch_size]):
                if r.error:
                    log.warning("a request failed: %s (answered with '')", r.error)
                texts.append(r.text if r.error is None and r.text is not None else "")
        it = iter(texts)
        return [next(it) if r is not None else "" for r in reqs]

    def generate_from_input(self, user_inputs: list[str], system_prompt: str = DEFAULT_SYSTEM,
                            image_inputs: Optional[Sequence] = None, video_inputs: Optional[Sequence] = None,
                            audio_inputs: Optional[Sequence] = None) -> list[str]:
        """One answer per input, in order; image_inputs: one list of images per input."""
        _no_media(video_inputs, audio_inputs)
        images = _image_lists(image_inputs, len(user_inputs))
        return self._answer([lambda i=i, p=p: self._request(p, images[i], system_prompt, i)
                             for i, p in enumerate(user_inputs)])

    def generate_from_input_messages(self, conversations: list[list[dict]], image_list: Optional[Sequence] = None,
                                     video_list: Optional[Sequence] = None, audio_list: Optional[Sequence] = None,
                                     system_prompt: str = DEFAULT_SYSTEM) -> list[str]:
        """One answer per conversation (turns as {"from","value"} or {"role","content"})."""
        _no_media(video_list, audio_list)
        images = _image_lists(image_list, len(conversations))
        return self._answer([lambda i=i, c=c: conversation_request(c, images[i], system_prompt, self.decoder)
                             for i, c in enumerate(conversations)])

    def cleanup(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


def _no_media(video, audio) -> None:
    if any(x for x in (video or [])) or any(x for x in (audio or [])):
        raise ValueError("video and audio inputs are not supported by persqa_ray's servings (images only)")


class LocalModelVLMServing_vllm(_Serving):  # noqa: N801 - DataFlow's public name
    """DataFlow-MM's constructor and defaults (top_k 40, seed 42, max_model_len 4096); the engine
    starts lazily on first use. `generate_from_input` takes prompts that are already
    chat-templated, as DataFlow operators pass them; prompt i samples with seed `vllm_seed + i`."""

    def __init__(self, hf_model_name_or_path: Optional[str] = None, hf_cache_dir: Optional[str] = None,
                 hf_local_dir: Optional[str] = None, vllm_tensor_parallel_size: int = 1,
                 vllm_temperature: float = 0.7, vllm_top_p: float = 0.9, vllm_max_tokens: int = 1024,
                 vllm_top_k: int = 40, vllm_repetition_penalty: float = 1.0, vllm_seed: Optional[int] = 42,
                 vllm_max_model_len: Optional[int] = 4096, vllm_gpu_memory_utilization: float = 0.9,
                 vllm_enforce_eager: Optional[bool] = None, vllm_limit_mm_per_prompt: int = 4,
                 batch_size: int = 64, **vllm_engine_kwargs):
        super().__init__()
        model = hf_model_name_or_path
        if hf_local_dir and os.path.isfile(os.path.join(hf_local_dir, "config.json")):
            model = hf_local_dir  # already downloaded there: use it (no hub access needed)
        if not model:
            raise ValueError("hf_model_name_or_path is required")
        if os.path.exists(os.path.expanduser(model)):
            model = os.path.abspath(os.path.expanduser(model))
        if hf_cache_dir:
            os.environ.setdefault("HF_HOME", hf_cache_dir)
        self.model_name = model
        self.hf_cache_dir = hf_cache_dir
        self.batch_size = batch_size
        self.seed = vllm_seed
        # enforce_eager None: the engine decides (eager on CPU, CUDA graphs on GPU).
        self.options = dict(
            model=model, tensor_parallel_size=vllm_tensor_parallel_size, max_model_len=vllm_max_model_len,
            gpu_memory_utilization=vllm_gpu_memory_utilization, enforce_eager=vllm_enforce_eager,
            max_images_per_prompt=vllm_limit_mm_per_prompt, max_tokens=vllm_max_tokens,
            temperature=vllm_temperature, top_p=vllm_top_p, top_k=None if vllm_top_k in (None, -1) else vllm_top_k,
            repetition_penalty=vllm_repetition_penalty, seed=vllm_seed or 0, engine_kwargs=dict(vllm_engine_kwargs))
        self._processor = None

    @property
    def spec(self) -> EngineSpec:
        return EngineSpec("vllm", dict(self.options))

    @property
    def processor(self):
        if self._processor is None:
            from transformers import AutoProcessor
            self._processor = AutoProcessor.from_pretrained(self.model_name, cache_dir=self.hf_cache_dir)
        return self._processor

    def _request(self, prompt: str, images: list, system_prompt: str, i: int) -> GenerationRequest:
        return GenerationRequest(system_prompt=system_prompt, user_prompt=prompt, prompt=prompt,
                                 images=[_as_array(x, self.decoder) for x in images],
                                 seed=None if self.seed is None else self.seed + i)


class APIVLMServing_openai(_Serving):  # noqa: N801 - DataFlow's public name
    """DataFlow-MM's constructor (api_url, key_name_of_api_key, model_name, image_io,
    send_request_stream, max_workers, timeout) over our OpenAI-compatible engine. As DataFlow-MM,
    a missing API key variable fails at once. `image_io` and `send_request_stream` are accepted and
    change nothing (answers are read whole). Extra keyword arguments: sampling (`max_tokens`,
    `temperature`, `top_p`; unset: the server's defaults), `max_attempts`, and `structured`
    ('vllm' when the server is `vllm serve`: the tag-first answer is forced there)."""

    def __init__(self, api_url: str = "https://api.openai.com/v1", key_name_of_api_key: str = "DF_API_KEY",
                 model_name: str = "o4-mini", image_io: Any = None, send_request_stream: bool = False,
                 max_workers: int = 10, timeout: float = 1800, *, max_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None, max_attempts: int = 4,
                 structured: str = "none"):
        super().__init__()
        if not os.environ.get(key_name_of_api_key):
            raise EnvironmentError(f"Missing environment variable '{key_name_of_api_key}'")
        del image_io, send_request_stream
        self.model_name = model_name
        self.api_url = api_url
        self.key_name_of_api_key = key_name_of_api_key
        self.max_workers = max_workers
        self.timeout = timeout
        self.options = dict(model=model_name, base_url=api_url, api_key_env=key_name_of_api_key,
                            max_concurrency=max_workers, request_timeout_s=float(timeout), max_attempts=max_attempts,
                            max_tokens=max_tokens, temperature=temperature, top_p=top_p, structured=structured)

    @property
    def spec(self) -> EngineSpec:
        return EngineSpec("openai", dict(self.options))

    def _request(self, prompt: str, images: list, system_prompt: str, i: int) -> GenerationRequest:
        return GenerationRequest(system_prompt=system_prompt, user_prompt=prompt,
                                 images=[_as_array(x, self.decoder) for x in images])
