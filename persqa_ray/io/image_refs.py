"""Normalize a row's image field to a list of references and resolve relative paths.

Resolution happens where the row is read (before rows leave for other nodes), so later stages
only ever see absolute local paths or URLs.
"""
from __future__ import annotations

from typing import Any

from persqa_ray import schema
from persqa_ray.io.filesystems import is_url, join


class RefError(ValueError):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def as_ref_list(value: Any) -> list[str]:
    """The image column as a list of strings; raises RefError for unusable values."""
    if value is None:
        raise RefError(schema.NO_IMAGE, "the image column is null")
    if isinstance(value, str):
        refs = [value]
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        refs = list(value)
    else:
        raise RefError(schema.BAD_RECORD, f"the image column holds a {type(value).__name__}, "
                                          "not a path or a list of paths")
    if not refs:
        raise RefError(schema.NO_IMAGE, "the image list is empty")
    for r in refs:
        if not isinstance(r, str):
            raise RefError(schema.BAD_RECORD, f"image reference {r!r} is a {type(r).__name__}, not a string")
        if not r.strip():
            raise RefError(schema.NO_IMAGE, "an image reference is an empty string")
    return refs


def resolve(ref: str, base: str) -> str:
    """Absolute local path or URL for one reference; 'file://' URLs become local paths."""
    ref = ref.strip()
    if ref.lower().startswith("file://"):
        return ref[len("file://"):]
    if is_url(ref) or ref.startswith("/"):
        return ref
    return join(base, ref)
