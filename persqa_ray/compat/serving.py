"""DataFlow-style VLM serving over persqa_ray's own vLLM engine (`engines/vllm_engine.py`)."""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, Optional, Sequence

import numpy as np

from persqa_ray.engines.base import EngineSpec, GenerationRequest


class LLMServingABC(ABC):
    """What an operator needs from a serving object (users' own servings subclass or duck-type it)."""

    @abstractmethod
    def generate_from_input(self, user_inputs: list[str], system_prompt: str = "",
                            image_inputs: Optional[list] = None) -> list[str]: ...

    def cleanup(self) -> None:  # noqa: B027 - optional hook
        pass


def _as_array(image: Any) -> np.ndarray:
    """A path, PIL image or array -> RGB uint8 array (the engine's input form)."""
    from PIL import Image, ImageOps
    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
    return np.asarray(image.convert("RGB"))


class LocalModelVLMServing_vllm(LLMServingABC):  # noqa: N801 - DataFlow's public name
    """Same constructor as DataFlow-MM's; the engine starts lazily on first use."""

    def __init__(self, hf_model_name_or_path: Optional[str] = None, hf_cache_dir: Optional[str] = None,
                 hf_local_dir: Optional[str] = None, vllm_tensor_parallel_size: int = 1,
                 vllm_temperature: float = 0.7, vllm_top_p: float = 0.9, vllm_max_tokens: int = 1024,
                 vllm_top_k: int = -1, vllm_repetition_penalty: float = 1.0, vllm_seed: Optional[int] = None,
                 vllm_max_model_len: Optional[int] = None, vllm_gpu_memory_utilization: float = 0.9,
                 vllm_enforce_eager: Optional[bool] = None, vllm_limit_mm_per_prompt: int = 4,
                 batch_size: int = 64, **vllm_engine_kwargs):
        model = hf_model_name_or_path
        if hf_local_dir and os.path.isfile(os.path.join(hf_local_dir, "config.json")):
            model = hf_local_dir  # already downloaded there: use it (no hub access needed)
        if not model:
            raise ValueError("hf_model_name_or_path: a model directory or hub id is required")
        if os.path.exists(os.path.expanduser(model)):
            model = os.path.abspath(os.path.expanduser(model))
        if hf_cache_dir:
            os.environ.setdefault("HF_HOME", hf_cache_dir)
        if vllm_enforce_eager is None:  # auto: eager on CPU-only machines (compilation: ~60 s at start)
            import torch
            vllm_enforce_eager = not torch.cuda.is_available()
        self.model_name = model
        self.hf_cache_dir = hf_cache_dir
        self.batch_size = batch_size
        self.seed = vllm_seed
        self.options = dict(
            model=model, tensor_parallel_size=vllm_tensor_parallel_size, max_model_len=vllm_max_model_len,
            gpu_memory_utilization=vllm_gpu_memory_utilization, enforce_eager=vllm_enforce_eager,
            max_images_per_prompt=vllm_limit_mm_per_prompt, max_tokens=vllm_max_tokens,
            temperature=vllm_temperature, top_p=vllm_top_p, top_k=None if vllm_top_k in (None, -1) else vllm_top_k,
            repetition_penalty=vllm_repetition_penalty, seed=vllm_seed or 0,
            engine_kwargs=dict(vllm_engine_kwargs))
        self._engine = None
        self._processor = None

    @property
    def spec(self) -> EngineSpec:
        return EngineSpec("vllm", dict(self.options))

    @property
    def engine(self):
        if self._engine is None:
            self._engine = self.spec.build()
        return self._engine

    @property
    def processor(self):
        if self._processor is None:
            from transformers import AutoProcessor
            self._processor = AutoProcessor.from_pretrained(self.model_name, cache_dir=self.hf_cache_dir)
        return self._processor

    def generate_from_input(self, user_inputs: list[str], system_prompt: str = "You are a helpful assistant.",
                            image_inputs: Optional[Sequence] = None) -> list[str]:
        """Prompts that are already chat-templated (as DataFlow operators pass them), with one list
        of images (paths, PIL images or arrays) per prompt. Returns one string per prompt."""
        images = list(image_inputs) if image_inputs is not None else [[] for _ in user_inputs]
        if len(images) != len(user_inputs):
            raise ValueError(f"image_inputs has {len(images)} entries for {len(user_inputs)} prompts")
        reqs = []
        for i, (prompt, imgs) in enumerate(zip(user_inputs, images)):
            imgs = [] if imgs is None else (imgs if isinstance(imgs, (list, tuple)) else [imgs])
            reqs.append(GenerationRequest(system_prompt=system_prompt, user_prompt=prompt, prompt=prompt,
                                          images=[_as_array(x) for x in imgs],
                                          seed=None if self.seed is None else self.seed + i))
        out = []
        for start in range(0, len(reqs), self.batch_size):
            out += [r.text if r.error is None else "" for r in self.engine.generate(reqs[start:start + self.batch_size])]
        return out

    def cleanup(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
