"""DataFlow-MM's documented examples (English and Chinese spelling) with only the import lines
(and the model path / input file) changed, run as plain scripts in a subprocess."""
import json
import re
import subprocess
import sys
import textwrap

import pytest
from PIL import Image
from skimage import data

from tests.conftest import clean_env

pytestmark = pytest.mark.slow

EN = '''
from persqa_ray.compat import FileStorage, LocalModelVLMServing_vllm, PersQAGenerate

serving = LocalModelVLMServing_vllm(
    hf_model_name_or_path="{model}",
    vllm_tensor_parallel_size=1, vllm_temperature=0.7, vllm_top_p=0.9, vllm_max_tokens=512)
storage = FileStorage(
    first_entry_file_name="data/example.jsonl", cache_path="./cache_local",
    file_name_prefix="pers_qa", cache_type="jsonl", media_key="image", media_type="image")
storage.step()
generator = PersQAGenerate(serving)
generator.run(storage=storage, multi_modal_key="image", output_key="pers_qa")
'''
ZH = '''
from persqa_ray.compat import FileStorage, LocalModelVLMServing_vllm, PersQAGenerator

serving = LocalModelVLMServing_vllm(
    hf_model_name_or_path="{model}",
    vllm_tensor_parallel_size=1, vllm_temperature=0.7, vllm_top_p=0.9, vllm_max_tokens=512)
storage = FileStorage(
    first_entry_file_name="data/example.jsonl", cache_path="./cache_local",
    file_name_prefix="pers_qa", cache_type="jsonl")
storage.step()
generator = PersQAGenerator(serving)
generator.run(storage=storage, input_modal_key="image", output_key="pers_qa")
'''
FORM = re.compile(r"^Question: .*<mam>.* Answer: <mam>", re.S)


def make_workdir(root):
    (root / "data").mkdir()
    (root / "test").mkdir()
    Image.fromarray(data.astronaut()).save(root / "test" / "example1.jpg")
    Image.fromarray(data.chelsea()).save(root / "test" / "example2.jpg")
    Image.fromarray(data.coffee()).save(root / "test" / "example3.jpg")
    rows = [{"image": ["./test/example1.jpg"], "id": "a"},
            {"image": ["./test/example1.jpg", "./test/example2.jpg"], "id": "b", "note": "two images"},
            {"image": "./test/example3.jpg", "id": "c"},
            {"image": ["./test/missing.jpg"], "id": "d"}]
    (root / "data" / "example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.parametrize("script", [EN, ZH], ids=["english-docs", "chinese-docs"])
def test_documented_example_runs_unchanged(tmp_path, tiny_model, script):
    rows_in = make_workdir(tmp_path)
    (tmp_path / "example.py").write_text(textwrap.dedent(script.format(model=tiny_model)))
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=480, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in (tmp_path / "cache_local" / "pers_qa_step1.jsonl").read_text().splitlines()]
    assert len(out) == len(rows_in)
    for src, row in zip(rows_in, out):
        assert {k: row[k] for k in src} == src  # every input column kept, values as given
    assert "note" not in out[0]  # no invented columns for keys a row never had
    ok = out[:3]
    assert all(r["status"] == "ok" and FORM.match(r["pers_qa"]) for r in ok)
    assert out[3]["pers_qa"] is None and out[3]["status"] == "missing_image" and "missing.jpg" in out[3]["error"]


def test_dataflow_example_script_as_documented(tmp_path, tiny_model, repo_root):
    """`python scripts/dataflow_example.py` from a directory holding data/example.jsonl (its
    docstring), in a clean environment: it used to fail on a CPU machine (KV cache of 90 % of
    the node's memory); the engine now sizes itself from the machine."""
    rows_in = make_workdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-qwen2-vl").symlink_to(tiny_model)  # the script's default model path
    proc = subprocess.run([sys.executable, str(repo_root / "scripts" / "dataflow_example.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=480, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(out) == len(rows_in) and all(FORM.match(r["pers_qa"]) for r in out[:3])


def readme_block(marker: str) -> str:
    """The fenced code block that follows `<!-- marker -->` in README.md, exactly as written."""
    from tests.conftest import REPO
    text = (REPO / "README.md").read_text(encoding="utf-8")
    after = text[text.index(f"<!-- {marker} -->"):]
    start = after.index("```python\n") + len("```python\n")
    return after[start:after.index("```", start)]


def test_readme_dataflow_snippet_as_written(tmp_path, tiny_model):
    """The README's DataFlow-MM snippet, run exactly as written (clean environment, a directory
    holding data/example.jsonl and models/tiny-qwen2-vl as its text says)."""
    rows_in = make_workdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-qwen2-vl").symlink_to(tiny_model)
    (tmp_path / "snippet.py").write_text(readme_block("dataflow-example"))
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=480, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in (tmp_path / "cache_local" / "pers_qa_step1.jsonl").read_text().splitlines()]
    assert len(out) == len(rows_in) and all(FORM.match(r["pers_qa"]) for r in out[:3])
    assert out[3]["status"] == "missing_image"
