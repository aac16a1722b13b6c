"""DataFlow-MM's personalized image-QA example, with only the import lines changed.

Runs as is from a directory holding data/example.jsonl (rows like {"image": ["./test/example1.jpg"]}).
MODEL defaults to the tiny CPU model; set PERSQA_MODEL to a real VLM directory for real answers.
    python scripts/make_demo_data.py demo_data   # any images will do; see README "Coming from DataFlow-MM"
    python scripts/dataflow_example.py
"""
import os

# before: from dataflow.utils.storage import FileStorage
# before: from dataflow.serving.local_model_vlm_serving import LocalModelVLMServing_vllm
# before: from dataflow.operators.core_vision import PersQAGenerate
from persqa_ray.compat import FileStorage, LocalModelVLMServing_vllm, PersQAGenerate

MODEL = os.environ.get("PERSQA_MODEL", "./models/tiny-qwen2-vl")  # was "./models/Qwen2.5-VL-3B-Instruct"

# Step 1: start the local model serving
serving = LocalModelVLMServing_vllm(
    hf_model_name_or_path=MODEL,
    vllm_tensor_parallel_size=1,
    vllm_temperature=0.7,
    vllm_top_p=0.9,
    vllm_max_tokens=512,
)

# Step 2: prepare the input data
storage = FileStorage(
    first_entry_file_name="data/example.jsonl",
    cache_path="./cache_local",
    file_name_prefix="pers_qa",
    cache_type="jsonl",
    media_key="image",
    media_type="image",
)
storage.step()

# Step 3: build and run the operator
generator = PersQAGenerate(serving)
generator.run(
    storage=storage,
    multi_modal_key="image",
    output_key="pers_qa",
)
print(open("cache_local/pers_qa_step1.jsonl", encoding="utf-8").read())
