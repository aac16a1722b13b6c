"""Run-wide counters kept by one small actor: what the driver cannot see without collecting data.

Read tasks report each shard's row count (idempotent per shard, so a retried task does not count
twice) or its failure; engine actors report restarts. The driver reads a snapshot at the end.
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
        self.claimed: set[str] = set()
        self.nodes: dict[str, set[str]] = {}

    def shard_read(self, shard: str, rows: int) -> None:
        self.shard_rows[shard] = rows

    def shard_failed(self, shard: str, error: str, rows_before: int) -> None:
        self.shard_rows[shard] = rows_before
        self.shard_errors[shard] = error

    def claim(self, ids: list[str]) -> list[bool]:
        """First claim of an input.id_column value wins; later rows with it are duplicates. Within a
        shard the order is the file's; across shards, whichever shard gets there first."""
        owned = []
        for i in ids:
            owned.append(i not in self.claimed)
            self.claimed.add(i)
        return owned

    def actor_started(self, stage: str, node_id: str) -> None:
        """Each actor reports the node it runs on: the summary shows where every stage ran."""
        self.nodes.setdefault(stage, set()).add(node_id)

    def record_max(self, key: str, value: int) -> None:
        self.counters[key] = max(self.counters.get(key, 0), value)

    def add(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def snapshot(self) -> dict:
        return {"rows_in": sum(self.shard_rows.values()), "shards": len(self.shard_rows),
                "shard_errors": dict(self.shard_errors),
                "nodes": {k: sorted(v) for k, v in sorted(self.nodes.items())}, **self.counters}
