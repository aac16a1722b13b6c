"""An OpenAI-compatible endpoint as the engine (`vllm serve`, SGLang, a hosted API).

Runs in CPU actors. Bounded concurrency per actor, retries with exponential backoff and jitter on
429/5xx/timeouts/connection errors, a per-request timeout, images sent as base64 data URLs of the
already-decoded and resized pixels. Structured output through vLLM's `structured_outputs`
extension (`engine.openai_structured: vllm`); answers are validated either way. The API key is
read from the environment variable named in the config and is never logged or returned.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import random
from typing import Optional, Sequence

import numpy as np

from persqa_ray.engines.base import (
    AsyncEngine,
    GenerationRequest,
    GenerationResult,
    chat_messages,
    prefix_regex,
    run_sync,
)

log = logging.getLogger(__name__)


def data_url(image: np.ndarray, quality: int = 95) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


MAX_RETRY_AFTER_S = 120.0


def retry_after(e: Exception) -> float:
    """Seconds the server asked us to wait (429/503 `Retry-After`, seconds or an HTTP date), capped."""
    headers = getattr(getattr(e, "response", None), "headers", None) or {}
    value = headers.get("retry-after") if hasattr(headers, "get") else None
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        import time
        from email.utils import parsedate_to_datetime
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class OpenAIEngine(AsyncEngine):
    def __init__(self, model: str, *, base_url: str, api_key_env: Optional[str] = None,
                 max_concurrency: int = 8, request_timeout_s: float = 120.0, max_attempts: int = 4,
                 backoff_s: float = 0.5, max_tokens: Optional[int] = 128, temperature: Optional[float] = 0.7,
                 top_p: Optional[float] = 0.9, structured: str = "vllm"):
        import openai

        self._openai = openai
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=key or "EMPTY",
                                         timeout=request_timeout_s, max_retries=0)
        self.model_name = model
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        # Unset sampling values are not sent: the server's defaults apply (DataFlow's API serving).
        self.sampling = {k: v for k, v in dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p).items()
                         if v is not None}
        self.structured = structured
        self._sem: Optional[asyncio.Semaphore] = None
        self._sync_used = False  # generate() ran on run_sync's loop: close the client there

    def _retryable(self, e: Exception) -> bool:
        o = self._openai
        if isinstance(e, (o.APITimeoutError, o.APIConnectionError, o.RateLimitError, o.InternalServerError)):
            return True
        return isinstance(e, o.APIStatusError) and (e.status_code == 429 or e.status_code >= 500)

    async def _one(self, req: GenerationRequest) -> GenerationResult:
        messages = chat_messages(req, [{"type": "image_url", "image_url": {"url": data_url(img)}}
                                       for img in req.all_images()])
        extra = {}
        if self.structured == "vllm" and req.choices:
            extra["extra_body"] = {"structured_outputs": {"choice": list(req.choices)}}
        elif self.structured == "vllm" and req.answer_prefix:
            extra["extra_body"] = {"structured_outputs": {"regex": prefix_regex(req.answer_prefix)}}
        loop = asyncio.get_running_loop()
        started = loop.time()
        error = "no attempt made"
        for attempt in range(self.max_attempts):
            try:
                async with self._sem:
                    resp = await self.client.chat.completions.create(
                        model=self.model_name, messages=messages, **self.sampling, **extra)
                usage = resp.usage
                return GenerationResult(text=resp.choices[0].message.content,
                                        num_input_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                                        num_output_tokens=getattr(usage, "completion_tokens", 0) or 0,
                                        latency_s=loop.time() - started)
            except Exception as e:  # noqa: BLE001
                # Exception text from the client names the status and the server's message, never
                # the key; keep only the type and status to be sure.
                error = f"{type(e).__name__}" + (f" {e.status_code}" if hasattr(e, "status_code") else "")
                if not self._retryable(e):
                    break
                if attempt + 1 < self.max_attempts:
                    delay = self.backoff_s * (2 ** attempt) * (0.5 + random.random())
                    await asyncio.sleep(max(delay, retry_after(e)))
        return GenerationResult(None, error=f"{error} after {attempt + 1} attempt(s)",
                                latency_s=loop.time() - started)

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """The same from synchronous code (the DataFlow servings), on the process's engine loop."""
        self._sync_used = True
        return super().generate(requests)

    def shutdown(self) -> None:
        if self._sync_used:  # the client's connections belong to that loop
            try:
                run_sync(self.client.close())
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
