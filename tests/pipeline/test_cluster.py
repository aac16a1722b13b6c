"""cluster.in_own_worker, with a real local Ray: what drives each Ray Data execution of a run."""
import os
import sys
import time

import pytest
import ray
from ray import cloudpickle

from persqa_ray.config import ConfigError, load_config
from persqa_ray.pipeline.cluster import in_own_worker, pid_alive

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the helpers below travel to the worker


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def drive_an_execution(rows: int) -> tuple[int, int]:
    """A Ray Data execution driven from here: this process owns its blocks (as a window's driver)."""
    ds = ray.data.range(rows, override_num_blocks=20).map_batches(lambda b: {"id": b["id"] * 2})
    return sum(len(b["id"]) for b in ds.iter_batches(batch_size=None)), os.getpid()


def wait_gone(pids: list[int], seconds: float = 30) -> list[int]:
    deadline = time.time() + seconds
    while [p for p in pids if pid_alive(p)] and time.time() < deadline:
        time.sleep(0.2)
    return [p for p in pids if pid_alive(p)]


def test_each_execution_is_driven_by_a_worker_that_is_gone_after_it(local_ray):
    results = [in_own_worker(drive_an_execution, 2000) for _ in range(2)]
    pids = [pid for _, pid in results]
    assert [n for n, _ in results] == [2000, 2000]
    assert os.getpid() not in pids and pids[0] != pids[1]  # not here, and not a reused worker
    # Gone while Ray runs on, with whatever Ray kept in it (the run's windows: tests/e2e/test_cli.py).
    assert wait_gone(pids) == []


def test_the_functions_own_error_is_raised_not_rays_wrapper(local_ray):
    with pytest.raises(ConfigError, match="engine.batch_size") as e:
        in_own_worker(load_config, {"input": {"path": "/x"}, "output": {"path": "/y"}, "engine": {"batch_size": -1}})
    assert not isinstance(e.value, ray.exceptions.RayTaskError) and "Traceback" not in str(e.value)
