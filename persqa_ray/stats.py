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
        self.owners: dict[str, str] = {}   # grows with input.id_column values: see claim()
        self.shard_extra: dict[str, dict] = {}
        self.nodes: dict[str, set[str]] = {}

    def shard_read(self, shard: str, rows: int, extra: dict, error: str | None = None) -> None:
        """Per shard, so a read task that Ray retries reports the same numbers, not twice."""
        self.shard_rows[shard] = rows
        self.shard_extra[shard] = extra
        if error:
            self.shard_errors[shard] = error

    def claim(self, ids: list[str], keys: list[str]) -> list[bool]:
        """First claim of an input.id_column value keeps it; `keys` name the claiming rows
        (shard, position), so a retried read task re-claiming its own ids gets them back.
        Across shards the first claim wins, whichever shard is read first. Memory grows with the
        number of ids (one actor): the known limit of input.id_column at very large scale."""
        owned = []
        for i, key in zip(ids, keys):
            owned.append(self.owners.setdefault(i, key) == key)
        return owned

    def actor_started(self, stage: str, node_id: str) -> None:
        """Each actor reports the node it runs on: the summary shows where every stage ran."""
        self.nodes.setdefault(stage, set()).add(node_id)

    def record_max(self, key: str, value: int) -> None:
        self.counters[key] = max(self.counters.get(key, 0), value)

    def add(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def snapshot(self) -> dict:
        extra: Counter = Counter()
        for e in self.shard_extra.values():
            extra.update(e)
        return {"rows_in": sum(self.shard_rows.values()), "shards": len(self.shard_rows), **extra,
                "shard_errors": dict(self.shard_errors),
                "nodes": {k: sorted(v) for k, v in sorted(self.nodes.items())}, **self.counters}
