"""DataFlow-MM compatibility: switch by changing only the import lines.

    # from dataflow.utils.storage import FileStorage
    # from dataflow.serving.local_model_vlm_serving import LocalModelVLMServing_vllm
    # from dataflow.serving.api_vlm_serving_openai import APIVLMServing_openai
    # from dataflow.operators.core_vision import PersQAGenerate
    from persqa_ray.compat import APIVLMServing_openai, FileStorage, LocalModelVLMServing_vllm, PersQAGenerate

The face follows DataFlow-MM at OpenDCAI/DataFlow-MM a5d48e0 (2026-03-10, version 0.0.1).
"""
from persqa_ray.compat.operator import PersQAGenerate, PersQAGenerator
from persqa_ray.compat.serving import APIVLMServing_openai, LLMServingABC, LocalModelVLMServing_vllm, VLMServingABC
from persqa_ray.compat.storage import DataFlowStorage, FileStorage

__all__ = ["PersQAGenerate", "PersQAGenerator", "FileStorage", "DataFlowStorage", "LocalModelVLMServing_vllm",
           "APIVLMServing_openai", "LLMServingABC", "VLMServingABC"]
