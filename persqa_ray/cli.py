"""`persqa-ray run|validate|export|report` (and `python -m persqa_ray ...`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="persqa-ray", description="Personalized visual-QA datasets on Ray Data + vLLM.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run the job"), ("validate", "check a config without running")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML config file")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set engine.batch_size=8 (repeatable)")
        s.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ...)")
        s.add_argument("--quiet", action="store_true", help="no progress bars; print only the summary")
        if name == "run":
            s.add_argument("--overwrite", action="store_true", help="start over: remove what persqa-ray wrote "
                           "in output.path (refused for inputs, their parents, ., ~, / and bucket roots)")
            s.add_argument("--retry-errors", nargs="?", const="engine_error", default=None, metavar="STATUS,...",
                           help="generate rows with these statuses again (default: engine_error); their new "
                           "rows replace the old error rows in one commit")
            s.add_argument("--json", action="store_true", help="print the summary as JSON")
            s.add_argument("--dry-run", action="store_true", help="print the resolved config and the first "
                           "requests (templates, prompts) without starting Ray or an engine")
        else:
            s.add_argument("--explain", action="store_true", help="list every config field with its description")
    e = sub.add_parser("export", help="write training files (LLaVA, ShareGPT, JSONL, RAP) from an output")
    e.add_argument("output", help="output directory or URL of a run")
    e.add_argument("--format", required=True, choices=["llava", "sharegpt", "jsonl", "rap"],
                   help="rap: LLaVA conversations plus RAP's concept database (database.json beside --out)")
    e.add_argument("--out", required=True, help="file to write (local or URL); with --split, NAME.train.EXT "
                   "and NAME.test.EXT")
    e.add_argument("--split", help="concept:FRACTION, e.g. concept:0.8 (no concept on both sides)")
    e.add_argument("--seed", type=int, default=0, help="seed of the concept split")
    e.add_argument("--image-root", help="write image paths relative to this directory")
    e.add_argument("--storage-options", default="{}", help="fsspec options as JSON (s3 endpoint, region, ...)")
    e.add_argument("--log-level", default="WARNING")
    r = sub.add_parser("report", help="one self-contained HTML page: gallery, summary, plots")
    r.add_argument("output", help="output directory or URL of a run")
    r.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    r.add_argument("--sample", type=int, default=24, help="rows shown in the gallery (default 24)")
    r.add_argument("--seed", type=int, default=0, help="seed of the sample")
    r.add_argument("--storage-options", default="{}", help="fsspec options as JSON (s3 endpoint, region, ...)")
    r.add_argument("--remote-images", action="store_true", help="also show images the run read from an object "
                   "store (s3://); default: local files only, and never http")
    r.add_argument("--log-level", default="WARNING")
    return p


def _report(args) -> int:
    from persqa_ray.export import ExportError
    from persqa_ray.report import build_report
    try:
        result = build_report(args.output, args.out, sample=args.sample, seed=args.seed,
                              storage_options=json.loads(args.storage_options), remote_images=args.remote_images)
    except (ExportError, json.JSONDecodeError) as e:
        print(f"persqa-ray report: {e}", file=sys.stderr)
        return 2
    print(f"{result['path']}: {result['rows']} output rows, {result['sampled']} sampled rows, "
          f"{result['real_images']} images shown (reference images included)")
    return 0




def _engine_resolution(cfg) -> str:
    """What the engine's 'auto' settings become (validate): decided again at start from the Ray
    cluster's resources; here from this machine's."""
    import glob
    e = cfg.engine
    if e.kind != "vllm":
        return f"engine: {e.kind} (CPU actors; no GPU reserved)"
    local_gpus = len(glob.glob("/proc/driver/nvidia/gpus/*"))
    if e.num_gpus == "auto":
        gpus = f"auto -> {e.tensor_parallel_size if local_gpus else 0} on this machine ({local_gpus} GPU(s) here; " \
               "a cluster run decides from the cluster's GPUs)"
    else:
        gpus = f"{e.num_gpus:g}" + ("" if local_gpus or not e.num_gpus else
                                   " (this machine has no GPU: a local run is refused; a cluster needs GPU nodes)")
    line = f"engine: vllm, num_gpus {gpus}"
    if not local_gpus:
        from persqa_ray.engines.vllm_engine import cpu_engine_settings
        settings = {k: os.environ.get(k, v) for k, v in cpu_engine_settings().items()}
        eager = "on" if e.enforce_eager in (None, True) else "off"
        line += f"; CPU engine settings: {settings}, enforce_eager {eager}"
    return line


def _dry_run(cfg) -> int:
    import yaml

    from persqa_ray.config import masked
    from persqa_ray.pipeline import plan, preview
    p = plan(cfg)
    print("# resolved config")
    print(yaml.safe_dump(masked(p.config.model_dump(mode="json")), sort_keys=False, allow_unicode=True))
    print(f"# {len(p.shards)} input shard(s); first requests (no Ray, no engine started)")
    for w in p.warnings:
        print(f"# warning: {w}")
    if p.personalization.recognition and p.personalization.concept_column:
        print("# 'No' recognition pairs need the run's concept pass over the input: not shown here")
    for r in preview(p):
        print(yaml.safe_dump(r, sort_keys=False, allow_unicode=True, width=120))
    return 0


def _export(args) -> int:
    from persqa_ray.export import ExportError, export
    try:
        options = json.loads(args.storage_options)
        result = export(args.output, args.format, args.out, split=args.split, seed=args.seed,
                        storage_options=options, image_root=args.image_root)
    except (ExportError, json.JSONDecodeError) as e:
        print(f"persqa-ray export: {e}", file=sys.stderr)
        return 2
    for path, n in result["files"].items():
        print(f"{path}: {n} {'concepts' if path == result.get('database') else 'records'}")
    if "train_concepts" in result:
        print(f"train concepts {len(result['train_concepts'])}, test concepts {len(result['test_concepts'])}, "
              f"dropped at the split (a 'No' pair or multi-concept row across sides) "
              f"{result['cross_split_pairs_dropped']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.command == "export":
        return _export(args)
    if args.command == "report":
        return _report(args)
    from persqa_ray.config import ConfigError, describe_fields, load_config

    overrides = list(args.overrides) + (["output.overwrite=true"] if getattr(args, "overwrite", False) else [])
    if getattr(args, "retry_errors", None):
        statuses = [x.strip() for x in args.retry_errors.split(",") if x.strip()]
        overrides.append("run.retry_errors=[" + ",".join(statuses) + "]")
    try:
        cfg = load_config(args.config, overrides)
        if args.command == "validate":
            from persqa_ray.pipeline import plan
            p = plan(cfg)
            print(f"config OK: {len(p.shards)} input shard(s), model {p.config.engine.model}, "
                  f"output {p.config.output.path}")
            print(_engine_resolution(p.config))
            if args.explain:
                for name, default, desc in describe_fields():
                    print(f"{name} = {default}\n    {desc}")
            return 0
        if args.dry_run:
            return _dry_run(cfg)
        if args.quiet:
            os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
            os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # read when ray.data configures logging
            os.environ["PERSQA_QUIET"] = "1"
        from persqa_ray.io.summary import human_summary
        from persqa_ray.pipeline import RunFailed, run
        try:
            summary = run(cfg)
        except RunFailed as e:
            print(json.dumps(e.summary, indent=2) if args.json else human_summary(e.summary))
            print(f"persqa-ray: run failed: {e}", file=sys.stderr)
            return 3
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a run that stopped: one clear line, the traceback in the log
            logging.getLogger("persqa_ray").debug("run stopped", exc_info=True)
            from persqa_ray.pipeline.cluster import cause_note
            note = cause_note(e)
            because = f" ({note})" if note else ""
            first, _, rest = str(e)[-2000:].partition("\n")  # the cause on the first line, where it is read
            print(f"persqa-ray: run stopped: {type(e).__name__}: {first}{because}" + (f"\n{rest}" if rest else ""),
                  file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"persqa-ray: config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if getattr(args, "json", False) else human_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
