"""One writer per output: a lease file (`_lease.json`) taken before any work.

The lease names its owner (a run id), host and pid, and carries a heartbeat and an expiry that a
driver thread renews every ttl/4 seconds. A second run on a live output stops at once with the
owner's name. A lease is taken over when it expired (its owner stopped heartbeating), or at once
when its owner ran on this host and that process is gone (a crashed or killed run: a rerun need
not wait out the ttl). Works on a local directory and on S3: the lease is written, then read back
after a short wait; of two runs racing for one output, the one whose write landed last keeps it
and the other stops (a conditional create is not available on every object store).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from persqa_ray.config import ConfigError
from persqa_ray.io.filesystems import is_url
from persqa_ray.io.outputs import LEASE_FILE

log = logging.getLogger(__name__)


class LeaseHeld(ConfigError):
    """Another live run owns the output."""


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of a process (tells a live pid from a reused one)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Lease:
    def __init__(self, fs, root: str, out_path: str, ttl_s: float = 120.0):
        self.fs, self.root, self.out_path, self.ttl = fs, root, out_path, ttl_s
        self.path = f"{root}/{LEASE_FILE}"
        self.owner = uuid.uuid4().hex[:16]
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _body(self) -> dict:
        now = time.time()
        return {"owner": self.owner, "host": self.host, "pid": self.pid, "pid_start": _process_start(self.pid),
                "heartbeat": round(now, 3), "expires": round(now + self.ttl, 3)}

    def _read(self) -> Optional[dict]:
        try:
            self.fs.invalidate_cache()
            with self.fs.open(self.path, "r") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write(self) -> None:
        data = json.dumps(self._body())
        if is_url(self.out_path):
            with self.fs.open(self.path, "w") as f:
                f.write(data)
            return
        tmp = f"{self.root}/.{LEASE_FILE}.{self.owner}.tmp"
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, self.path)

    def _stale(self, held: dict) -> Optional[str]:
        """Why a lease held by someone else may be taken over, or None if it is live."""
        if held.get("expires", 0) < time.time():
            return "it expired"
        if held.get("host") == self.host:
            pid = int(held.get("pid", 0))
            if not pid or _process_start(pid) is None or _process_start(pid) != held.get("pid_start"):
                return f"its process {pid} on this host is gone"
        return None

    def acquire(self) -> "Lease":
        held = self._read()
        if held and held.get("owner") != self.owner:
            why = self._stale(held)
            if why is None:
                raise LeaseHeld(self._held_message(held))
            log.warning("taking over the lease of run %s on %s: %s", held.get("owner"), self.out_path, why)
        if not is_url(self.out_path):
            os.makedirs(self.root, exist_ok=True)
        self._write()
        time.sleep(1.0 if is_url(self.out_path) else 0.2)  # let a racing writer's lease land
        mine = self._read()
        if not mine or mine.get("owner") != self.owner:
            raise LeaseHeld(self._held_message(mine or {}))
        self._thread = threading.Thread(target=self._beat, name="persqa-lease", daemon=True)
        self._thread.start()
        return self

    def _held_message(self, held: dict) -> str:
        age = time.time() - float(held.get("heartbeat", time.time()))
        return (f"output.path: {self.out_path} is being written by another run (owner {held.get('owner')}, "
                f"pid {held.get('pid')} on {held.get('host')}, last heartbeat {age:.0f} s ago, lease expires in "
                f"{float(held.get('expires', 0)) - time.time():.0f} s); wait for it to finish, or use another path")

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            held = self._read()
            if held and held.get("owner") != self.owner:
                self.lost = f"run {held.get('owner')} on {held.get('host')} took over the lease"
                log.error("lost the lease on %s: %s", self.out_path, self.lost)
                return
            try:
                self._write()
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried on the next beat
                log.warning("lease renewal failed (%s)", type(e).__name__)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held and held.get("owner") == self.owner:
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass
