"""Windows of shards: whole shards, at least one per window, sized from the bytes per row seen."""
from persqa_ray.io.filesystems import Shard
from persqa_ray.pipeline.windows import FIRST_GUESS_BYTES_PER_ROW, Windows


def shards(*sizes):
    return [Shard(f"s{i:03d}.jsonl", "jsonl", size) for i, size in enumerate(sizes)]


def test_first_window_uses_the_small_guess_then_the_rows_seen():
    w = Windows(shards(*[1000] * 10), window_rows=100)
    it = iter(w)
    first = next(it)
    assert len(first) == 100 * FIRST_GUESS_BYTES_PER_ROW // 1000  # 3 shards of 1000 bytes in 3200
    w.observe(rows_read=30)  # 100 bytes per row: a window of 100 rows is 10,000 bytes
    assert [s.path for s in next(it)] == [f"s{i:03d}.jsonl" for i in range(3, 10)]
    assert next(it, None) is None and w.windows == 2


def test_a_shard_larger_than_a_window_is_a_window_of_its_own():
    w = Windows(shards(10, 10**9, 10), window_rows=10)
    got = []
    for window in w:
        got.append([s.size for s in window])
        w.observe(rows_read=sum(sum(x) for x in got) // 64)
    assert got == [[10], [10**9], [10]]


def test_zero_means_one_execution_and_every_shard_is_taken_once():
    assert [len(x) for x in Windows(shards(5, 6, 7), window_rows=0)] == [3]
    w = Windows(shards(*range(1, 50)), window_rows=2)
    seen = [s.path for window in w for s in window]
    assert seen == [s.path for s in shards(*range(1, 50))] and w.windows > 1
