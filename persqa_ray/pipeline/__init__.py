"""The pipeline: plan a run, compose its stages on Ray Data, run it (the public API's back end).

    plan.py        everything checked on the driver before work starts
    stage_list.py  the stages, in order (the only place that knows it)
    executors.py   Ray Data, or this process (the DataFlow face)
    run.py         run() and build_dataset(); windows.py: one execution per window of shards
    cluster.py     Ray, GPUs, engine actors; concepts.py: the input's concepts; preview.py: --dry-run
"""
from persqa_ray.pipeline.plan import Plan, plan
from persqa_ray.pipeline.preview import preview
from persqa_ray.pipeline.run import RunFailed, build_dataset, run

__all__ = ["Plan", "plan", "preview", "RunFailed", "build_dataset", "run"]
