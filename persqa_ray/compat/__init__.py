"""DataFlow-MM compatibility: switch by changing only the import lines.

    # from dataflow.utils.storage import FileStorage
    # from dataflow.serving.local_model_vlm_serving import LocalModelVLMServing_vllm
    # from dataflow.operators.core_vision import PersQAGenerate
    from persqa_ray.compat import FileStorage, LocalModelVLMServing_vllm, PersQAGenerate
"""
from persqa_ray.compat.operator import PersQAGenerate, PersQAGenerator
from persqa_ray.compat.serving import LLMServingABC, LocalModelVLMServing_vllm
from persqa_ray.compat.storage import DataFlowStorage, FileStorage

__all__ = ["PersQAGenerate", "PersQAGenerator", "FileStorage", "DataFlowStorage",
           "LocalModelVLMServing_vllm", "LLMServingABC"]
