"""Run-wide counters kept by one small actor: what the driver cannot see without collecting data.

Read tasks report each shard's row count and resume numbers (idempotent per shard, so a retried
task does not count twice) or its failure; engine actors report restarts. Memory: O(shards). The
driver reads a snapshot at the end.
"""
from __future__ import annotations

from collections import Counter

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class RunStats:
    def __init__(self):
        self.shard_rows: dict[str, int] = {}
        self.shard_errors: dict[str, str] = {}
        self.counters: Counter = Counter()
        self.shard_extra: dict[str, dict] = {}
        self.nodes: dict[str, set[str]] = {}
        self.live: dict[str, set[tuple[str, int]]] = {}  # engine actors started and not yet stopped

    def shard_read(self, shard: str, rows: int, extra: dict, error: str | None = None) -> None:
        """Per shard, so a read task that Ray re-executes reports the same numbers, not twice. Its
        cleanup of what an earlier run left is done once: a re-execution finds nothing left, so
        those counts keep the first report's."""
        before = self.shard_extra.get(shard, {})
        for key in ("records_dropped", "orphan_files_removed"):
            if key in extra or key in before:
                extra = {**extra, key: max(extra.get(key, 0), before.get(key, 0))}
        self.shard_rows[shard] = rows
        self.shard_extra[shard] = extra
        if error:
            self.shard_errors[shard] = error

    def actor_started(self, stage: str, node_id: str, pid: int = 0) -> None:
        """Each actor reports the node it runs on: the summary shows where every stage ran."""
        self.nodes.setdefault(stage, set()).add(node_id)
        if pid:
            self.live.setdefault(stage, set()).add((node_id, pid))

    def actor_stopped(self, stage: str, node_id: str, pid: int) -> None:
        """An actor that shut its engine down (the driver waits for these before it exits)."""
        self.live.get(stage, set()).discard((node_id, pid))

    def live_actors(self, stage: str) -> list:
        return sorted(self.live.get(stage, set()))

    def record_max(self, key: str, value: int) -> None:
        self.counters[key] = max(self.counters.get(key, 0), value)

    def counter(self, key: str) -> int:
        return self.counters.get(key, 0)

    def add(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def rows_in(self) -> int:
        return sum(self.shard_rows.values())

    def snapshot(self) -> dict:
        extra: Counter = Counter()
        for e in self.shard_extra.values():
            extra.update(e)
        return {"rows_in": sum(self.shard_rows.values()), "shards": len(self.shard_rows), **extra,
                "shard_errors": dict(self.shard_errors),
                "nodes": {k: sorted(v) for k, v in sorted(self.nodes.items())}, **self.counters}
