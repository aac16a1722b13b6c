"""The run's counters (the actor's class, called directly: its rules, not Ray's delivery)."""
from persqa_ray.stats import RunStats


def test_a_re_executed_read_task_reports_its_shard_once_keeping_the_first_cleanup():
    stats = RunStats.__ray_actor_class__()
    stats.shard_read("a", 5, {"rows_resumed": 2, "records_dropped": 1, "orphan_files_removed": 3})
    stats.shard_read("b", 4, {"rows_resumed": 0, "records_dropped": 0, "orphan_files_removed": 0})
    # Ray ran shard a's task again: same rows, and the earlier run's leftovers are already gone.
    stats.shard_read("a", 5, {"rows_resumed": 2, "records_dropped": 0, "orphan_files_removed": 0})
    snap = stats.snapshot()
    assert (snap["rows_in"], snap["shards"], snap["rows_resumed"]) == (9, 2, 2)
    assert (snap["records_dropped"], snap["orphan_files_removed"]) == (1, 3)
