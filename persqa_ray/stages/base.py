"""The stage contract, after Ray's batch-LLM `StatefulStage` and NeMo Curator's stages.

A stage declares its UDF (a function over batches, or a class built once per actor: its setup is
`__init__`, its teardown `__del__`), the keyword arguments it is built with, how Ray Data runs it
(batch size, actor pool, batches in flight, CPUs, GPUs, custom resources, the actor's
environment), and the columns it needs and adds. The pipeline is one ordered list of stages
(`pipeline/stage_list.py`), run by one of two executors (`pipeline/executors.py`): Ray Data for
runs and notebooks, this process for the DataFlow face.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

Pool = Union[int, tuple[int, int]]


@dataclass(frozen=True)
class Stage:
    name: str
    udf: Any = None                       # fn(batch, **kwargs) or a class: cls(**kwargs)(batch)
    kwargs: dict = field(default_factory=dict)
    needs: tuple[str, ...] = ()           # columns it reads
    adds: tuple[str, ...] = ()            # columns it writes
    batch_size: Optional[int] = None      # rows per call; None: whole blocks
    batch_format: str = "pyarrow"
    pool: Optional[Pool] = None           # actor pool size (class UDFs): N or (min, max)
    in_flight: Optional[int] = None       # batches one (async) actor works on at once
    num_cpus: Optional[float] = None
    num_gpus: Optional[float] = None
    resources: dict = field(default_factory=dict)
    runtime_env: Optional[dict] = None
    block_rows: Optional[int] = None      # a re-blocking stage: no UDF, output blocks of this many rows
    in_process: bool = True               # False: only on Ray (reading shards, committing files)

    @property
    def is_class(self) -> bool:
        return isinstance(self.udf, type)

    def map_batches_kwargs(self) -> dict[str, Any]:
        """This stage as Ray Data's `map_batches` arguments."""
        import ray
        kw: dict[str, Any] = {"batch_size": self.batch_size, "batch_format": self.batch_format}
        kw["fn_constructor_kwargs" if self.is_class else "fn_kwargs"] = dict(self.kwargs)
        if self.is_class:
            extra = {} if not self.in_flight else {"max_tasks_in_flight_per_actor": self.in_flight,
                                                   "max_concurrent_calls_per_actor": self.in_flight}
            lo, hi = self.pool if isinstance(self.pool, (tuple, list)) else (self.pool or 1, self.pool or 1)
            kw["compute"] = ray.data.ActorPoolStrategy(min_size=int(lo), max_size=int(hi), **extra)
        for name in ("num_cpus", "num_gpus", "runtime_env"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        if self.resources:
            kw["resources"] = dict(self.resources)
        return kw

    def apply(self, ds):
        """Add this stage to a Ray Dataset (lazy)."""
        if self.block_rows:  # stages/blocks.py says why
            return ds.repartition(target_num_rows_per_block=self.block_rows)
        return ds.map_batches(self.udf, **self.map_batches_kwargs())


def check_chain(stages: list[Stage], given: tuple[str, ...] = ()) -> None:
    """Each stage's needs are met by the columns given or added before it (a wiring error fails
    here, when the list is built, not hours into a run)."""
    have = set(given)
    for st in stages:
        missing = [c for c in st.needs if c not in have]
        if missing:
            raise ValueError(f"stage {st.name!r} needs {missing}, which no stage before it adds")
        have.update(st.adds)
