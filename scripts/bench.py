"""Benchmark: the pipeline next to the bare engine, on the same inputs, model and token counts.

    .venv/bin/python scripts/bench.py [--n 96] [--max-tokens 32] [--contenders bare,async,sync,standin]
                                      [--model models/tiny-qwen2-vl] [--out bench.json]
    .venv/bin/python scripts/bench.py --gpu --model /models/Qwen2.5-VL-3B-Instruct --n 2000

Inputs: N JPEGs made from scikit-image's photos at realistic camera sizes (640x480 .. 4000x3000).
Every contender decodes them, resizes to the same pixel budget, asks the same kind of prompt with
the same sampling settings and `ignore_eos`, so each generates exactly max_tokens per row.
Contenders (each in its own process; peak RSS is the whole process tree, sampled every 0.2 s):
  bare     one process, no Ray: PIL decode+resize (the pipeline's own decoder function), then
           vLLM's offline LLM.generate over all prompts: the ceiling for this model and machine
  async    persqa-ray run, engine.async_engine=true (batches in flight)
  sync     persqa-ray run, engine.async_engine=false (offline LLM API per batch)
  standin  persqa-ray run with engine.kind=standin: NO MODEL, fixed text (a benchmark instrument
           that isolates the pipeline's own cost: rows/s per CPU core)
Prints a table and writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(640, 480), (1280, 960), (1920, 1080), (4000, 3000)]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]


def make_inputs(d: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image
    from skimage import data
    (d / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name, size = PHOTOS[i % len(PHOTOS)], SIZES[i % len(SIZES)]
        path = d / "images" / f"{i:05d}_{name}_{size[0]}x{size[1]}.jpg"
        if not path.exists():
            Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").resize(size).save(path, quality=90)
        rows.append({"image": [f"images/{path.name}"], "n": i})
    shard = d / "bench.jsonl"
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return shard


def bare_engine(shard: str, model: str, max_tokens: int, max_pixels: int, gpu: bool) -> dict:
    """Run in a child process: the same work with no pipeline at all."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    from persqa_ray.config import ImageConfig
    from persqa_ray.engines.base import prefix_regex
    from persqa_ray.stages.decode import DecodeOptions, ImageDecoder
    from persqa_ray.stages.requests import RequestOptions, plan_questions
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams
    img = ImageConfig(max_pixels=max_pixels)
    base = os.path.dirname(shard)
    dec = ImageDecoder(DecodeOptions(max_pixels=max_pixels, min_pixels=img.min_pixels, factor=28,
                                     max_aspect_ratio=150.0, max_decode_pixels=100_000_000,
                                     max_image_bytes=1 << 30, max_images=4, allowed_roots=(base,),
                                     allowed_schemes=("file",), storage_options={}))
    ro = RequestOptions("mam", 0, 1, "en")
    kw = dict(model=model, limit_mm_per_prompt={"image": 4, "video": 0}, seed=0, max_model_len=4096)
    if not gpu:
        kw["enforce_eager"] = True
    llm = LLM(**kw)
    t_engine = time.time() - t0
    tok = llm.get_tokenizer()
    t1 = time.time()
    inputs = []
    for i, line in enumerate(open(shard)):
        rec = json.loads(line)
        arr = dec.decode(os.path.join(base, rec["image"][0]))
        _, _, prompts = plan_questions(ro, f"bench-{i}")
        msgs = [{"role": "system", "content": ro.render_system_prompt()},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompts[0]}]}]
        inputs.append({"prompt": tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                       "multi_modal_data": {"image": [arr]}})
    t_decode = time.time() - t1
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9, ignore_eos=True,
                        structured_outputs=StructuredOutputsParams(regex=prefix_regex("<mam>")))
    outs = llm.generate(inputs, sp, use_tqdm=False)
    return {"rows": len(outs), "engine_start_s": round(t_engine, 2), "decode_s": round(t_decode, 2),
            "input_tokens": sum(len(o.prompt_token_ids) for o in outs),
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def run_measured(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, str]:
    """(seconds, peak RSS GiB of the process tree, stdout)."""
    import psutil
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}): {out[-2000:]}")
    return time.time() - t0, peak / 2**30, out


def pipeline_config(shard: Path, out: Path, model: str, max_tokens: int, max_pixels: int, gpu: bool,
                    **engine) -> dict:
    e = {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.7, "batch_size": 16,
         "max_model_len": 4096}
    if not gpu:
        e.update(num_gpus=0, num_cpus=1, enforce_eager=True,
                 env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1"})
    e.update(engine)
    return {"input": {"path": str(shard), "block_rows": 64},
            "image": {"max_pixels": max_pixels, "batch_size": 8, "concurrency": 1, "num_cpus": 0.5},
            "engine": e, "output": {"path": str(out), "overwrite": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-qwen2-vl"))
    ap.add_argument("--max-pixels", type=int, default=None, help="default: 50176 on CPU, 1003520 with --gpu")
    ap.add_argument("--contenders", default="bare,async,sync,standin")
    ap.add_argument("--gpu", action="store_true", help="GPU node: one GPU per engine, no eager mode")
    ap.add_argument("--work", default=None, help="where inputs/outputs go (default: a temp dir)")
    ap.add_argument("--out", default="bench.json")
    a = ap.parse_args()
    max_pixels = a.max_pixels or (1003520 if a.gpu else 50176)
    work = Path(a.work or tempfile.mkdtemp(prefix="persqa-bench-"))
    shard = make_inputs(work, a.n)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1", PERSQA_QUIET="1",
               VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND="nobind")
    results = []
    for name in a.contenders.split(","):
        if name == "bare":
            code = (f"import json,sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import bench; "
                    f"print('RESULT', json.dumps(bench.bare_engine({str(shard)!r}, {a.model!r}, {a.max_tokens}, "
                    f"{max_pixels}, {a.gpu})))")
            secs, rss, out = run_measured([sys.executable, "-c", code], work, env)
            r = json.loads(out.split("RESULT ", 1)[1])
        else:
            extra = {"async": {"async_engine": True}, "sync": {"async_engine": False},
                     "standin": {"kind": "standin"}}[name]
            cfg = pipeline_config(shard, work / f"out-{name}", a.model, a.max_tokens, max_pixels, a.gpu, **extra)
            cfg_path = work / f"{name}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            secs, rss, out = run_measured([sys.executable, "-m", "persqa_ray", "run", str(cfg_path), "--json",
                                           "--quiet"], work, env)
            s = json.loads(out[out.index("{"):])
            r = {"rows": s["rows_in"], "rows_ok": s["rows_ok"], "input_tokens": s["input_tokens"],
                 "output_tokens": s["output_tokens"], "max_batches_in_flight": s.get("max_batches_in_flight")}
        r.update(contender=name, seconds=round(secs, 2), rows_per_s=round(r["rows"] / secs, 3),
                 prompt_tok_per_s=round(r["input_tokens"] / secs, 1),
                 output_tok_per_s=round(r["output_tokens"] / secs, 1), peak_rss_gib=round(rss, 2))
        results.append(r)
        print(f"[bench] {name}: {r['seconds']} s, {r['rows_per_s']} rows/s", file=sys.stderr)
    bare = next((r for r in results if r["contender"] == "bare"), None)
    for r in results:
        r["ratio_to_bare"] = round(r["rows_per_s"] / bare["rows_per_s"], 3) if bare else None
    report = {"n": a.n, "max_tokens": a.max_tokens, "model": a.model, "max_pixels": max_pixels,
              "cpu_count": os.cpu_count(), "results": results}
    Path(a.out).write_text(json.dumps(report, indent=2))
    cols = ["contender", "rows", "seconds", "rows_per_s", "prompt_tok_per_s", "output_tok_per_s", "peak_rss_gib",
            "ratio_to_bare"]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(r.get(c)) for c in cols))


if __name__ == "__main__":
    main()
