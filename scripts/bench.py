"""Benchmark: the pipeline next to the bare engine, on the same inputs, model and token counts.

    .venv/bin/python scripts/bench.py [--n 96] [--max-tokens 32] [--contenders bare,async,sync,standin]
                                      [--model models/tiny-qwen2-vl] [--out bench.json]
    .venv/bin/python scripts/bench.py --gpu --model /models/Qwen2.5-VL-3B-Instruct --n 2000

Inputs: N JPEGs made from scikit-image's photos at realistic camera sizes (640x480 .. 4000x3000).
Every contender decodes them, resizes to the same pixel budget, asks the same kind of prompt with
the same sampling settings and `ignore_eos`, so each generates exactly max_tokens per row.
Contenders (each in its own process; peak RSS is the whole process tree, sampled every 0.2 s):
  bare     one process, no Ray: PIL decode+resize (the pipeline's own decoder function), then
           vLLM's offline LLM.generate over all prompts (decoding and generating in sequence)
  engine   engine-only, the honest ceiling: the same process as bare, timed without its decode
           step (vLLM's offline API over images already decoded and resized in memory: engine
           start-up plus generation only). `ratio_to_engine` is each contender's rows/s over it.
  async    persqa-ray run, engine.async_engine=true (batches in flight)
  sync     persqa-ray run, engine.async_engine=false (offline LLM API per batch)
  raydata  Ray's own ray.data.llm (vLLMEngineProcessorConfig + build_processor): the same decode
           and resize in its preprocess, same prompt, sampling, batch size and batches in flight
  standin  persqa-ray run with engine.kind=standin: NO MODEL, fixed text (a benchmark instrument
           that isolates the pipeline's own cost: rows/s per CPU core)
Prints a table and writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(640, 480), (1280, 960), (1920, 1080), (4000, 3000)]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]


def make_inputs(d: Path, n: int, distinct: int = 0) -> Path:
    import numpy as np
    from PIL import Image
    from skimage import data
    (d / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        i_file = i % distinct if distinct else i  # long runs may cycle over a pool of distinct files
        name, size = PHOTOS[i_file % len(PHOTOS)], SIZES[i_file % len(SIZES)]
        path = d / "images" / f"{i_file:05d}_{name}_{size[0]}x{size[1]}.jpg"
        if not path.exists():
            Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").resize(size).save(path, quality=90)
        rows.append({"image": [f"images/{path.name}"], "n": i})
    shard = d / "bench.jsonl"
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return shard


def make_small_inputs(d: Path, n: int, shards: int = 8) -> Path:
    """n rows over `shards` JSONL shards, all pointing at 16 small photos (<= 256 px): the memory
    benchmark measures the pipeline's own footprint as rows grow, not image sizes."""
    import numpy as np
    from PIL import Image
    from skimage import data
    (d / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(16):
        name = PHOTOS[i % len(PHOTOS)]
        path = d / "images" / f"small_{i:02d}_{name}.jpg"
        if not path.exists():
            side = 128 + 8 * i
            Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").resize((side, side * 3 // 4)) \
                .save(path, quality=85)
        names.append(path.name)
    for s in range(shards):
        with open(d / f"rows-{s:02d}.jsonl", "w") as f:
            for i in range(s, n, shards):
                f.write(json.dumps({"image": [f"images/{names[i % 16]}"], "n": i}) + "\n")
    return d


def _standin_run(work: Path, name: str, inputs: Path, out: Path, env: dict, block_rows: int = 512,
                 window_rows: int | None = None) -> dict:
    """One stand-in pipeline run through the CLI, measured: wall time, peak RSS of the driver and
    of the whole process tree (driver, Ray's processes, workers)."""
    cfg = {"input": {"path": str(inputs), "block_rows": block_rows},
           "image": {"max_pixels": 50176, "batch_size": 64, "concurrency": 1, "num_cpus": 0.5},
           "engine": {"kind": "standin", "model": "standin", "max_tokens": 16, "batch_size": 64,
                      "num_cpus": 0.5, "max_batches_in_flight": 4},
           "output": {"path": str(out)},
           # A fixed object store: a run long enough fills whatever store it has (the default is
           # 30% of RAM), which is fill-up, not growth with rows; with a cap both sizes compare.
           "ray": {"object_store_memory": 2**30}}
    if window_rows is not None:
        cfg["run"] = {"window_rows": window_rows}
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    secs, _, text, peaks, at_peak = run_measured(
        [sys.executable, "-m", "persqa_ray", "run", str(cfg_path), "--json", "--quiet"], work, env, driver=True)
    s = json.loads(text[text.index("{"):])
    r = {"rows_in": s["rows_in"], "rows_generated": s["rows_in"] - s["rows_resumed"],
         "rows_resumed": s["rows_resumed"], "consistent": s["consistent"], "duplicates": s["duplicates"],
         "block_rows": block_rows, "windows": s.get("windows", 1),
         "seconds": round(secs, 1), "pipeline_seconds": s["seconds"],
         **{f"{k}_gib": round(v, 3) for k, v in peaks.items()},
         "tree_at_pss_no_store_peak_mib": at_peak}
    print(f"[bench] {name}: {r}", file=sys.stderr)
    return r


def memory_bench(work: Path, sizes: list[int], env: dict, block_rows: int = 512,
                 window_rows: int | None = None) -> list[dict]:
    """Peak RSS of the driver and of the whole process tree for the stand-in pipeline at each N."""
    out = []
    tag = f"b{block_rows}-w{window_rows}"
    for n in sizes:
        d = make_small_inputs(work / f"mem-{n}", n)
        r = _standin_run(work, f"mem-{n}-{tag}", d, work / f"mem-out-{n}-{tag}", env, block_rows, window_rows)
        out.append({"rows": n, "window_rows": window_rows, **r})
    return out


def resume_bench(work: Path, n: int, env: dict, output: Path, tag: str = "new") -> dict:
    """Resume an N-row output with 1% of rows left (a new shard of N/100 rows), next to a fresh
    run of the same 1%: start-up time and driver memory should be close (the resume state is
    loaded per shard by the read tasks, never on the driver)."""
    d = work / f"mem-{n}"
    extra = n // 100
    shutil.copy(d / "rows-00.jsonl", work / "tmp-head.jsonl")
    lines = (work / "tmp-head.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    with open(d / f"rows-{tag}.jsonl", "w") as f:
        for i in range(extra):
            f.write(json.dumps({**rows[i % len(rows)], "n": n + i}) + "\n")
    resumed = _standin_run(work, f"resume-{n}-{tag}", d, output, env)
    fresh_dir = work / f"fresh-{extra}-{tag}"
    (fresh_dir).mkdir(exist_ok=True)
    if not (fresh_dir / "images").exists():
        (fresh_dir / "images").symlink_to(d / "images")
    shutil.copy(d / f"rows-{tag}.jsonl", fresh_dir / f"rows-{tag}.jsonl")
    fresh = _standin_run(work, f"fresh-{extra}-{tag}", fresh_dir, work / f"fresh-out-{extra}-{tag}", env)
    return {"output_rows": n, "rows_left": extra, "resume": resumed, "fresh": fresh}


def decode_bench(work: Path, n: int, max_pixels: int) -> dict:
    """One core, one process: a bare PIL loop (open, RGB, resize to the same target size with the
    same filter) vs the pipeline's DecodeStage over pyarrow batches (fetch, limits, EXIF, draft
    decode, resize, uint8 bytes into Arrow): rows/s of each and their ratio."""
    import pyarrow as pa
    from PIL import Image

    from persqa_ray import schema
    from persqa_ray.stages.decode import DecodeOptions, DecodeStage, target_size
    shard = make_inputs(work, n)
    base = str(shard.parent)
    paths = [os.path.join(base, json.loads(line)["image"][0]) for line in shard.read_text().splitlines()]
    opts = DecodeOptions(max_pixels=max_pixels, min_pixels=3136, factor=28, max_aspect_ratio=150.0,
                         max_decode_pixels=100_000_000, max_image_bytes=1 << 30, max_images=4,
                         allowed_roots=(base,), allowed_schemes=("file",), storage_options={})
    for p in paths[:8]:  # warm the page cache for both
        Path(p).read_bytes()
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            h, w = target_size(im.height, im.width, opts.factor, opts.min_pixels, opts.max_pixels)
            im.resize((w, h), Image.BICUBIC).tobytes()
    bare = time.perf_counter() - t0
    stage = DecodeStage(opts)
    batch = pa.table({"row_id": [str(i) for i in range(n)], "image": [[p] for p in paths],
                      "status": [schema.OK] * n, "error": pa.array([None] * n, pa.string())})
    t0 = time.perf_counter()
    for start in range(0, n, 16):
        out = stage(batch.slice(start, 16))
        assert out.column("status").to_pylist() == [schema.OK] * out.num_rows
    ours = time.perf_counter() - t0
    return {"rows": n, "max_pixels": max_pixels, "bare_pil_rows_per_s": round(n / bare, 1),
            "decode_stage_rows_per_s": round(n / ours, 1), "ratio": round(bare / ours, 3)}


def bare_engine(shard: str, model: str, max_tokens: int, max_pixels: int, gpu: bool) -> dict:
    """Run in a child process: the same work with no pipeline at all."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from persqa_ray.config import ImageConfig
    from persqa_ray.engines.base import prefix_regex
    from persqa_ray.personalization.items import open_items
    from persqa_ray.personalization.options import PersonalizationOptions
    from persqa_ray.stages.decode import DecodeOptions, ImageDecoder
    img = ImageConfig(max_pixels=max_pixels)
    base = os.path.dirname(shard)
    dec = ImageDecoder(DecodeOptions(max_pixels=max_pixels, min_pixels=img.min_pixels, factor=28,
                                     max_aspect_ratio=150.0, max_decode_pixels=100_000_000,
                                     max_image_bytes=1 << 30, max_images=4, allowed_roots=(base,),
                                     allowed_schemes=("file",), storage_options={}))
    po = PersonalizationOptions("mam", 0, 1, "en")  # the pipeline's own prompts for the same rows
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
        item = open_items(po, f"bench-{i}", po.registry.resolve(None)[0], None)[0]
        msgs = [{"role": "system", "content": item["system"]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["prompt"]}]}]
        inputs.append({"prompt": tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                       "multi_modal_data": {"image": [arr]}})
    t_decode = time.time() - t1
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9, ignore_eos=True,
                        structured_outputs=StructuredOutputsParams(regex=prefix_regex("<mam>")))
    outs = llm.generate(inputs, sp, use_tqdm=False)
    return {"rows": len(outs), "engine_start_s": round(t_engine, 2), "decode_s": round(t_decode, 2),
            "input_tokens": sum(len(o.prompt_token_ids) for o in outs),
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def ray_data_llm(shard: str, model: str, max_tokens: int, max_pixels: int, gpu: bool,
                 batch_size: int = 16, in_flight: int = 4) -> dict:
    """Run in a child process: Ray's own ray.data.llm (vLLMEngineProcessorConfig + build_processor)
    on the same rows: same decode+resize (in its preprocess map), same prompt, same sampling,
    same batch size, one engine, the same number of batches in flight."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    ray.init(num_cpus=None if gpu else max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    t0 = time.time()
    base = os.path.dirname(shard)
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")
           if k in os.environ}
    config = vLLMEngineProcessorConfig(
        model_source=model, batch_size=batch_size, concurrency=1, max_concurrent_batches=in_flight,
        log_engine_metrics=False,  # its Prometheus logger fails to import here (and we export none either)
        engine_kwargs=dict(enforce_eager=not gpu, max_model_len=4096, seed=0,
                           limit_mm_per_prompt={"image": 4, "video": 0}),
        # Its four CPU stages get half a CPU each, like our decode actors: with a whole CPU each they
        # and the engine's bundle need more CPUs than Ray has here and the job hangs.
        prepare_multimodal_stage={"enabled": True, "num_cpus": 0.5, "concurrency": 1},
        chat_template_stage={"enabled": True, "num_cpus": 0.5, "concurrency": 1},
        tokenize_stage={"enabled": True, "num_cpus": 0.5, "concurrency": 1},
        detokenize_stage={"enabled": True, "num_cpus": 0.5, "concurrency": 1},
        runtime_env={"env_vars": env},
        **({} if gpu else {"placement_group_config": {"bundles": [{"CPU": 1}]}}))

    def preprocess(row: dict) -> dict:
        from PIL import Image

        from persqa_ray.engines.base import prefix_regex
        from persqa_ray.personalization.items import open_items
        from persqa_ray.personalization.options import PersonalizationOptions
        from persqa_ray.stages.decode import DecodeOptions, ImageDecoder
        dec = ImageDecoder(DecodeOptions(max_pixels=max_pixels, min_pixels=3136, factor=28, max_aspect_ratio=150.0,
                                         max_decode_pixels=100_000_000, max_image_bytes=1 << 30, max_images=4,
                                         allowed_roots=(base,), allowed_schemes=("file",), storage_options={}))
        po = PersonalizationOptions("mam", 0, 1, "en")
        item = open_items(po, f"bench-{row['n']}", po.registry.resolve(None)[0], None)[0]
        image = Image.fromarray(dec.decode(os.path.join(base, row["image"][0])))
        return dict(messages=[{"role": "system", "content": item["system"]},
                              {"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                                           {"type": "text", "text": item["prompt"]}]}],
                    sampling_params=dict(max_tokens=max_tokens, temperature=0.7, top_p=0.9, ignore_eos=True,
                                         structured_outputs={"regex": prefix_regex("<mam>")}))

    def postprocess(row: dict) -> dict:
        return dict(text=row["generated_text"], n_in=int(row.get("num_input_tokens") or 0),
                    n_out=int(row.get("num_generated_tokens") or 0))

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    out = processor(ray.data.read_json(shard)).materialize()
    rows = out.take_all()
    return {"rows": len(rows), "wall_in_child_s": round(time.time() - t0, 2),
            "input_tokens": sum(r["n_in"] for r in rows), "output_tokens": sum(r["n_out"] for r in rows),
            "tag_first": sum(r["text"].startswith("<mam>") for r in rows)}


def run_measured(cmd: list[str], cwd: Path, env: dict, timeout: float = 3600, driver: bool = False):
    """(seconds, peak RSS GiB of the process tree, stdout[, peaks, at_peak]): with driver=True also a
    dict of peak GiB: the child's (the driver's) RSS, USS, PSS and RSS less its object-store pages,
    and the tree's RSS, PSS and PSS less the store's pages; and the tree at that last peak, process
    by process (MiB of PSS less store pages per kind of process, with how many there were). RSS
    summed over processes counts a shared page (Ray's object store, mapped by every worker) once per
    process that touched it; PSS splits it among them, so the PSS sum is the tree's real footprint.
    The child's own RSS includes the store's pages it has touched; its USS is its private memory.
    The store's pages are also counted apart: they are the store's (bounded by its size, shared by
    every worker), not a process's own growth. The child runs in its own process group, killed whole
    on timeout or when this process is interrupted."""
    import signal
    t0 = time.time()
    log = open(Path(cwd) / f"contender-{int(t0)}.err", "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                            start_new_session=True)
    try:
        secs, out, peaks, at_peak = _measure(proc, t0, timeout)
        gib = {k: v / 2**30 for k, v in peaks.items()}
        return (secs, gib["tree_peak_rss"], out, gib, at_peak) if driver else (secs, gib["tree_peak_rss"], out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _measure(proc, t0: float, timeout: float) -> tuple[float, str, dict[str, int], dict[str, dict]]:
    """Peak bytes of the child and its tree: RSS every 0.2 s, the smaps figures once a second; and
    which processes made up the tree when its PSS less store pages peaked."""
    import psutil
    peaks = dict.fromkeys(("driver_peak_rss", "driver_peak_uss", "driver_peak_pss", "driver_peak_rss_no_store",
                           "tree_peak_rss", "tree_peak_pss", "tree_peak_pss_no_store"), 0)

    def high(key: str, value: int) -> None:
        peaks[key] = max(peaks[key], value)

    root = psutil.Process(proc.pid)
    last_smaps = 0.0
    at_peak: dict[str, dict] = {}
    while proc.poll() is None:
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{proc.args[:3]} ran past {timeout} s")
        try:
            root_rss = root.memory_info().rss
            high("driver_peak_rss", root_rss)
            procs = [root] + root.children(recursive=True)
            high("tree_peak_rss", sum(p.memory_info().rss for p in procs if p.is_running()))
            if time.time() - last_smaps >= 1.0:  # one smaps pass per process, once a second
                last_smaps = time.time()
                maps = {p.pid: _smaps(p.pid) for p in procs}
                high("tree_peak_pss", sum(m["pss"] for m in maps.values()))
                # The tree without the object store's pages: what its processes hold themselves.
                own_pages = {pid: m["pss"] - m["store_pss"] for pid, m in maps.items()}
                tree_own = sum(own_pages.values())
                if tree_own > peaks["tree_peak_pss_no_store"]:
                    at_peak = _by_kind(procs, own_pages)
                high("tree_peak_pss_no_store", tree_own)
                own = maps[root.pid]
                high("driver_peak_uss", own["uss"])
                high("driver_peak_pss", own["pss"])
                high("driver_peak_rss_no_store", root_rss - own["store_rss"])
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{proc.args[:4]} failed ({proc.returncode}): {out[-2000:]} "
                           "(its stderr: contender-*.err in the work dir)")
    return time.time() - t0, out, peaks, at_peak


def _by_kind(procs, pages: dict[int, int]) -> dict[str, dict]:
    """{kind of process: {"mib": summed pages, "n": how many}}, the kind being Ray's title for a
    worker ("ray::MapWorker(MapBatches(DecodeStage))", "ray::IDLE") or the program's name."""
    kinds: dict[str, dict] = {}
    for p in procs:
        try:
            cmd = p.cmdline()
        except Exception:  # noqa: BLE001 - a process that ended in between: not counted
            continue
        head = cmd[0].split()[0] if cmd else "?"
        if head.startswith("ray::"):
            kind = head
        else:
            script = next((a for a in cmd[1:] if a.endswith(".py") or a.startswith("persqa")), "")
            kind = " ".join(x for x in (Path(head).name, Path(script).name if script else "") if x)
        k = kinds.setdefault(kind, {"mib": 0.0, "n": 0})
        k["mib"] += pages.get(p.pid, 0) / 2**20
        k["n"] += 1
    return {k: {"mib": round(v["mib"], 1), "n": v["n"]} for k, v in sorted(kinds.items(), key=lambda x: -x[1]["mib"])}


def _smaps(pid: int) -> dict[str, int]:
    """One pass over /proc/PID/smaps: bytes of the process's PSS and USS (its private pages), and
    the RSS and PSS of its mappings of Ray's object store (/dev/shm/plasma*). Zeros for a process
    that ended between listing and reading."""
    totals = dict.fromkeys(("pss", "uss", "store_rss", "store_pss"), 0)
    in_store = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(maxsplit=6)
                if not head:
                    continue
                if not head[0].endswith(":"):  # a mapping's first line: range perms ... path
                    in_store = len(head) > 5 and head[5].startswith("/dev/shm/plasma")
                    continue
                kb = int(head[1]) * 1024 if len(head) > 1 and head[1].isdigit() else 0
                if head[0] in ("Private_Clean:", "Private_Dirty:"):
                    totals["uss"] += kb
                elif head[0] == "Pss:":
                    totals["pss"] += kb
                    totals["store_pss"] += kb if in_store else 0
                elif head[0] == "Rss:" and in_store:
                    totals["store_rss"] += kb
    except OSError:
        return dict.fromkeys(totals, 0)
    return totals


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
    ap.add_argument("--contenders", default="engine,bare,async,sync,standin")
    ap.add_argument("--gpu", action="store_true", help="GPU node: one GPU per engine, no eager mode")
    ap.add_argument("--work", default=None, help="where inputs/outputs go (default: a temp dir)")
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--memory", default=None, metavar="N1,N2",
                    help="instead: peak memory of the stand-in pipeline at each N (e.g. 10000,100000)")
    ap.add_argument("--resume", action="store_true",
                    help="with --memory: then resume the largest output with 1%% of rows left, next to a fresh "
                    "run of that 1%%")
    ap.add_argument("--block-rows", type=int, default=512,
                    help="with --memory: input.block_rows (small blocks magnify per-block costs)")
    ap.add_argument("--window-rows", type=int, default=None,
                    help="with --memory: run.window_rows (default: the config's)")
    ap.add_argument("--distinct", type=int, default=0,
                    help="rows cycle over this many distinct image files (0: one file per row)")
    ap.add_argument("--decode", type=int, default=None, metavar="N",
                    help="instead: DecodeStage vs a bare PIL decode+resize loop on one core, N images")
    a = ap.parse_args()
    max_pixels = a.max_pixels or (1003520 if a.gpu else 50176)
    work = Path(a.work or tempfile.mkdtemp(prefix="persqa-bench-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1", PERSQA_QUIET="1",
               VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND="nobind", RAY_DATA_LOG_LEVEL="WARNING")
    if a.decode:
        r = decode_bench(work, a.decode, max_pixels)
        Path(a.out).write_text(json.dumps({"mode": "decode", **r}, indent=2))
        print(json.dumps(r, indent=2))
        return
    if a.memory:
        sizes = [int(x) for x in a.memory.split(",")]
        results = memory_bench(work, sizes, env, a.block_rows, a.window_rows)
        first, last = results[0], results[-1]
        report = {"mode": "memory", "engine": "standin (benchmark instrument: no model)",
                  "cpu_count": os.cpu_count(), "results": results,
                  # driver_peak_rss_gib -> driver_rss_ratio_last_to_first, for every peak _measure keeps
                  **{k.replace("_peak_", "_").removesuffix("_gib") + "_ratio_last_to_first":
                     round(last[k] / first[k], 3) for k in first if k.endswith("_gib") and "_peak_" in k}}
        if a.resume:
            report["resume"] = resume_bench(work, sizes[-1], env,
                                            work / f"mem-out-{sizes[-1]}-b{a.block_rows}-w{a.window_rows}")
        Path(a.out).write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return
    shard = make_inputs(work / "inputs", a.n, a.distinct)  # outputs beside it, never inside an input
    results = []
    for name in a.contenders.split(","):
        if name in ("bare", "engine", "raydata"):
            fn = "ray_data_llm" if name == "raydata" else "bare_engine"
            code = (f"import json,sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import bench; "
                    f"print('RESULT', json.dumps(bench.{fn}({str(shard)!r}, {a.model!r}, {a.max_tokens}, "
                    f"{max_pixels}, {a.gpu})))")
            secs, rss, out = run_measured([sys.executable, "-c", code], work, env)
            r = json.loads(out.split("RESULT ", 1)[1])
            if name == "engine":  # images already in memory: the decode step is not the engine's time
                secs -= r["decode_s"]
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
    ceiling = next((r for r in results if r["contender"] == "engine"), None)
    for r in results:
        r["ratio_to_bare"] = round(r["rows_per_s"] / bare["rows_per_s"], 3) if bare else None
        r["ratio_to_engine"] = round(r["rows_per_s"] / ceiling["rows_per_s"], 3) if ceiling else None
    report = {"n": a.n, "max_tokens": a.max_tokens, "model": a.model, "max_pixels": max_pixels,
              "cpu_count": os.cpu_count(), "results": results}
    Path(a.out).write_text(json.dumps(report, indent=2))
    cols = ["contender", "rows", "seconds", "rows_per_s", "prompt_tok_per_s", "output_tok_per_s", "peak_rss_gib",
            "ratio_to_bare", "ratio_to_engine"]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(r.get(c)) for c in cols))


if __name__ == "__main__":
    main()
