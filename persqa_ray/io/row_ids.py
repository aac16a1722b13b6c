"""Stable row ids: the given id column, else a hash of (shard path, row position in it)."""
from __future__ import annotations

import hashlib


def positional_row_id(shard: str, position: int) -> str:
    # The same image may appear in many rows, so the image path is no id; the shard's path and the
    # row's position in it are unique per input row and stable across reruns of the same input.
    return hashlib.blake2b(f"{shard}\x00{position}".encode(), digest_size=8).hexdigest()


def given_row_id(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)
