"""Windows: a run executes its shards as successive Ray Data executions of about
`run.window_rows` input rows each.

Why: Ray keeps some memory per block in the process that drives an execution: for its life, the
metadata and stats of every operator's output blocks (7-18 KB per block), and after it ≈ 8 KiB a
block that is never given back; one execution over 100M rows would grow by gigabytes. Windows
bound the first part by the window's size, and each window is driven from a worker of its own that
is ended after it (pipeline/cluster.py `in_own_worker`), which takes the second part with it. A
window is whole shards, in path order (the commit protocol and the resume state are per shard).
Its row count is predicted from the shards' bytes (known from the listing) at the bytes per row
seen in the windows before; the first window uses a deliberately small guess, so it is more likely
too large than too small. Each window starts its actor pools anew (an engine start: ~30 s on CPU,
1-2 min on a GPU), hence windows of millions of rows. Memory here: the shard list (O(shards),
never rows).
"""
from __future__ import annotations

from typing import Iterator, Sequence

from persqa_ray.io.filesystems import Shard

# Bytes per input row assumed before any shard was read: small, so a first window of short rows
# (a JSONL row naming one image is ~30-60 bytes) is not far larger than window_rows.
FIRST_GUESS_BYTES_PER_ROW = 32


class Windows:
    """Iterate over windows of shards; call `observe(rows_read_so_far)` after each window."""

    def __init__(self, shards: Sequence[Shard], window_rows: int):
        self.shards = list(shards)
        self.window_rows = window_rows
        self.next = 0           # index of the first shard not yet in a window
        self.rows_read = 0      # input rows of the shards in past windows
        self.windows = 0

    def bytes_per_row(self) -> float:
        done_bytes = sum(s.size for s in self.shards[:self.next])
        if self.rows_read and done_bytes:
            return done_bytes / self.rows_read
        return FIRST_GUESS_BYTES_PER_ROW

    def observe(self, rows_read: int) -> None:
        self.rows_read = rows_read

    def __iter__(self) -> Iterator[list[Shard]]:
        while self.next < len(self.shards):
            if self.window_rows <= 0:
                end = len(self.shards)
            else:
                budget = self.window_rows * self.bytes_per_row()
                end, used = self.next + 1, self.shards[self.next].size  # at least one shard
                while end < len(self.shards) and used + self.shards[end].size <= budget:
                    used += self.shards[end].size
                    end += 1
            window, self.next = self.shards[self.next:end], end
            self.windows += 1
            yield window
