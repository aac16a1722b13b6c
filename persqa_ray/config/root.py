"""The whole run's config: its sections, and the checks that span several of them."""
from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from persqa_ray.config.engines import EngineConfig, VLLMEngineConfig
from persqa_ray.config.sections import (
    ImageConfig,
    InputConfig,
    OutputConfig,
    PromptConfig,
    RayConfig,
    RunConfig,
    _Section,
)


class PersQAConfig(_Section):
    input: InputConfig
    image: ImageConfig = Field(default_factory=ImageConfig, description="Decode and resize.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="Tag, questions, templates.")
    engine: EngineConfig = Field(default_factory=VLLMEngineConfig, description="The VLM engine and its pool "
                                 "(engine.kind picks the engine and its fields).")
    output: OutputConfig
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    run: RunConfig = Field(default_factory=RunConfig, description="Failure threshold, error retries, windows.")

    @model_validator(mode="before")
    @classmethod
    def _default_engine_kind(cls, data: Any) -> Any:
        # `kind` picks the engine model; a config that names none means the default engine, vLLM.
        if isinstance(data, dict) and isinstance(data.get("engine"), dict) and "kind" not in data["engine"]:
            data = {**data, "engine": {**data["engine"], "kind": "vllm"}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> "PersQAConfig":
        from PIL import Image
        Image.init()
        unknown = [f for f in self.image.formats if f.upper() not in Image.OPEN]
        if unknown:
            raise ValueError(f"image.formats: {unknown} are not formats PIL can open here")
        if self.image.min_pixels > self.image.max_pixels:
            raise ValueError("image.min_pixels must not exceed image.max_pixels")
        pr = self.prompt
        if pr.recognition_negatives == "similar" and not self.input.embedding_column:
            raise ValueError("prompt.recognition_negatives: 'similar' needs input.embedding_column")
        if pr.reference_images_in_prompt and pr.max_reference_images + 1 > self.engine.max_images_per_prompt:
            raise ValueError(f"prompt.max_reference_images: {pr.max_reference_images} reference image(s) and the "
                             f"query image exceed engine.max_images_per_prompt={self.engine.max_images_per_prompt}; "
                             "raise that limit or show fewer reference images")
        return self
