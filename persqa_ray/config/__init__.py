"""The whole run's configuration: pydantic models (one per section, one per engine kind), YAML
loading with `--set` overrides, masking for printed copies, and the field reference.

Every field has a description (`persqa-ray validate --explain` prints them); unknown keys are
refused; a bad value is reported as `section.field: reason` before any work starts.
"""
from persqa_ray.config.engines import (
    ENGINE_KINDS,
    EngineConfig,
    OpenAIEngineConfig,
    StandInEngineConfig,
    VLLMEngineConfig,
)
from persqa_ray.config.errors import ConfigError
from persqa_ray.config.loading import describe_fields, load_config, masked, parse_override
from persqa_ray.config.root import PersQAConfig
from persqa_ray.config.sections import (
    PARTITIONABLE_COLUMNS,
    TRANSIENT_STATUSES,
    ConceptConfig,
    ImageConfig,
    InputConfig,
    OutputConfig,
    PromptConfig,
    RayConfig,
    RunConfig,
)

__all__ = ["ConfigError", "PersQAConfig", "load_config", "masked", "describe_fields", "parse_override",
           "EngineConfig", "VLLMEngineConfig", "OpenAIEngineConfig", "StandInEngineConfig", "ENGINE_KINDS",
           "InputConfig", "ImageConfig", "PromptConfig", "ConceptConfig", "OutputConfig", "RayConfig", "RunConfig",
           "PARTITIONABLE_COLUMNS", "TRANSIENT_STATUSES"]
