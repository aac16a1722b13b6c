"""The stage contract: what a stage declares becomes Ray Data's arguments, and a list whose
columns do not chain is refused when it is built."""
import pytest
import ray

from persqa_ray.stages.base import Stage, check_chain


class Doubler:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, batch):
        return batch


def test_a_class_stage_becomes_an_actor_pool_with_its_resources():
    st = Stage("x", Doubler, {"factor": 2}, batch_size=8, pool=(1, 3), in_flight=4, num_cpus=0.5, num_gpus=1.0,
               resources={"gpu_pool": 1}, runtime_env={"env_vars": {"A": "1"}})
    kw = st.map_batches_kwargs()
    assert kw["fn_constructor_kwargs"] == {"factor": 2} and "fn_kwargs" not in kw
    assert isinstance(kw["compute"], ray.data.ActorPoolStrategy)
    assert (kw["compute"].min_size, kw["compute"].max_size) == (1, 3)
    assert kw["compute"].max_tasks_in_flight_per_actor == 4
    assert (kw["batch_size"], kw["num_cpus"], kw["num_gpus"]) == (8, 0.5, 1.0)
    assert kw["resources"] == {"gpu_pool": 1} and kw["runtime_env"] == {"env_vars": {"A": "1"}}


def test_a_function_stage_runs_as_tasks_with_its_kwargs():
    kw = Stage("f", len, {"opts": 1}).map_batches_kwargs()
    assert kw["fn_kwargs"] == {"opts": 1} and "compute" not in kw and "num_gpus" not in kw
    assert kw["batch_size"] is None  # whole blocks


def test_columns_must_chain():
    a = Stage("a", len, needs=("x",), adds=("y",))
    b = Stage("b", len, needs=("y", "z"), adds=())
    check_chain([a], ("x",))
    with pytest.raises(ValueError, match=r"stage 'b' needs \['z'\]"):
        check_chain([a, b], ("x",))
