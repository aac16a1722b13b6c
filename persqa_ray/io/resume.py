"""Resume state of one shard, loaded by that shard's read task (never built on the driver).

The task lists `_commits/<shard key>/` of the output, and under the run's lease:
- deletes the files an unfinished commit announced (`.pending` without its record: a crash),
- drops records whose files are missing or changed (their rows are redone), deleting what is
  left of them (files this job wrote; nothing else is touched),
- returns the positions done, as compact ranges, minus the rows `--retry-errors` redoes.
Memory per task: one shard's ranges, which stay a handful for a shard written in order.

It sees only what *earlier* runs left: this run's own intents, records and temporary files (they
carry its run id) are neither cleaned up nor counted as done. Ray re-executes a read task after
its worker died, or to rebuild a lost block, at any point of the run; Ray requires that such a
task yield the same blocks again (it skips those already taken), so the state must not depend on
how far this run got. Counting this run's commits as done once shifted a retried task's blocks
and made `rows_resumed` count rows this run wrote; cleaning up its intents in flight would delete
files a writer is about to record.
"""
from __future__ import annotations

import bisect
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from persqa_ray.io.commits import (
    COMMITS_DIR,
    merge_ranges,
    output_root,
    ranges_len,
    read_json,
    record_files_present,
    shard_dir,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeOptions:
    path: str                       # output.path
    storage_options: dict
    retry_statuses: tuple[str, ...] = ()   # --retry-errors: rows with these statuses are redone
    run_id: str = ""                # this run's id (its lease owner): its own commits are not "earlier"
    fault: Optional[str] = None     # PERSQA_FAULT of the driver (tests only): see crash_read_task_once


@dataclass
class ShardState:
    done: list[list[int]] = field(default_factory=list)     # merged [start, end) ranges
    retry: dict[str, list[list[int]]] = field(default_factory=dict)  # record uid -> positions to redo
    records_dropped: int = 0
    orphan_files_removed: int = 0
    _starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self):
        self._starts = [s for s, _ in self.done]

    def is_done(self, position: int) -> bool:
        i = bisect.bisect_right(self._starts, position) - 1
        return i >= 0 and position < self.done[i][1]

    @property
    def rows_done(self) -> int:
        return ranges_len(self.done)


def _rm_quiet(fs, path: str) -> int:
    try:
        fs.rm(path)
        return 1
    except FileNotFoundError:
        return 0


def _subtract(ranges: list[list[int]], cut: list[list[int]]) -> list[list[int]]:
    out = []
    for s, e in ranges:
        pieces = [[s, e]]
        for cs, ce in cut:
            nxt = []
            for ps, pe in pieces:
                if ce <= ps or cs >= pe:
                    nxt.append([ps, pe])
                    continue
                if ps < cs:
                    nxt.append([ps, cs])
                if ce < pe:
                    nxt.append([ce, pe])
            pieces = nxt
        out += pieces
    return merge_ranges(out)


def load_shard_state(shard: str, opts: ResumeOptions) -> ShardState:
    fs, root = output_root(opts.path, opts.storage_options)
    sdir = shard_dir(root, shard)
    if not fs.exists(sdir):
        return ShardState()
    names = sorted(fs.ls(sdir, detail=False))
    records = {os.path.basename(p)[:-5]: p for p in names
               if p.endswith(".json") and not os.path.basename(p).startswith(".")}
    own = opts.run_id
    state = ShardState()
    for path in names:
        base = os.path.basename(path)
        if base.endswith(".tmp"):  # a record's or intent's own temporary file: a crash mid-write
            if not (own and base.endswith(f".{own}.tmp")):  # (not this run's write in flight)
                _rm_quiet(fs, path)
        elif base.endswith(".pending"):
            intent = read_json(fs, path) or {}
            if own and intent.get("run") == own:
                continue  # this run's commit in flight (this task is a re-execution)
            if base[:-8] not in records:
                for rel in intent.get("files", []):
                    state.orphan_files_removed += _rm_quiet(fs, f"{root}/{rel}")
                    d = f"{root}/{os.path.dirname(rel)}"
                    state.orphan_files_removed += _rm_quiet(fs, f"{d}/.{os.path.basename(rel)}.tmp")
            _rm_quiet(fs, path)  # with its record, the crash fell after step 3: only the intent is left
    done, retry_cut, trusted = [], [], {}
    for uid, path in records.items():
        rec = read_json(fs, path)
        if rec is not None and own and rec.get("run") == own:
            continue  # written by this run: not done *before* it (see the module's docstring)
        if rec is None or not record_files_present(fs, root, rec):
            # Not trusted: remove what is left of it (files we wrote) and redo its rows.
            for f in (rec or {}).get("files", []):
                _rm_quiet(fs, f"{root}/{f['path']}")
            _rm_quiet(fs, path)
            state.records_dropped += 1
            log.warning("commit record %s of %s is missing files: its rows will be redone", uid, shard)
            continue
        trusted[uid] = rec
        done += rec["ranges"]
    # Rows a later record replaced (an earlier retry) are no longer this record's to redo.
    replaced: dict[str, list] = {}
    for rec in trusted.values():
        for old, sup in rec.get("supersedes", {}).items():
            replaced.setdefault(old, []).extend(sup["ranges"])
    for uid, rec in trusted.items():
        redo = merge_ranges([r for st in opts.retry_statuses for r in rec.get("errors", {}).get(st, [])])
        if redo and uid in replaced:
            redo = _subtract(redo, merge_ranges(replaced[uid]))
        if redo:
            state.retry[uid] = redo
            retry_cut += redo
    state.done = _subtract(merge_ranges(done), merge_ranges(retry_cut)) if retry_cut else merge_ranges(done)
    state.__post_init__()
    return state


def crash_read_task_once(shard: str, opts: ResumeOptions, wait_s: float = 300.0) -> None:
    """Fault injection (PERSQA_FAULT=read_crash, tests only): the first read task to get here dies
    once this run has committed rows of its shard (rows it yielded), as a worker lost mid-run does;
    Ray re-executes the task. Called after each block the task yields from its second on (Ray Data
    holds a task's last block until the next one: by then one block has left the task)."""
    if opts.fault != "read_crash":
        return
    fs, root = output_root(opts.path, opts.storage_options)
    marker = f"{root}/{COMMITS_DIR}/.fault-read-crash"  # once per output: the re-execution goes on
    sdir = shard_dir(root, shard)
    deadline = time.time() + wait_s
    while not fs.exists(marker) and time.time() < deadline:
        fs.invalidate_cache()
        if fs.exists(sdir) and [p for p in fs.ls(sdir, detail=False) if p.endswith(".json")
                                and not os.path.basename(p).startswith(".")]:
            with fs.open(marker, "w") as f:
                f.write(shard)
            log.warning("PERSQA_FAULT=read_crash: the read task of %s dies now", shard)
            os._exit(17)
        time.sleep(0.2)


def retry_owner(state: ShardState, position: int) -> Optional[str]:
    """The record whose error row at `position` this run redoes (None: not a retried row)."""
    for uid, ranges in state.retry.items():
        if any(s <= position < e for s, e in ranges):
            return uid
    return None
