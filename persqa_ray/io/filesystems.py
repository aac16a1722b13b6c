"""fsspec access for local paths and URLs (s3:// through s3fs), plus listing of input shards."""
from __future__ import annotations

import os
import posixpath
from typing import Any, Iterable, NamedTuple

import fsspec

SHARD_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def is_url(path: str) -> bool:
    return "://" in path


def normalize_url(url: str) -> str:
    """scheme://bucket/key with '..' and '.' resolved and the scheme lower-cased: what a root check
    compares, and what is fetched (so a reference cannot say one place and read another)."""
    scheme, rest = url.split("://", 1)
    return f"{scheme.lower()}://{posixpath.normpath('/' + rest).lstrip('/')}"


def under_root(url: str, roots) -> bool:
    """A normalized URL equal to or below one of the normalized URL roots."""
    return any(url == r.rstrip("/") or url.startswith(r.rstrip("/") + "/") for r in roots)


def scheme_of(path: str) -> str:
    return path.split("://", 1)[0].lower() if is_url(path) else "file"


def filesystem(path: str, storage_options: dict[str, Any] | None = None):
    """(fs, path within it) for a local path or URL; storage options apply to URLs only."""
    if not is_url(path):
        return fsspec.filesystem("file"), path
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs, p


def _with_scheme(fs, p: str, original: str) -> str:
    return fs.unstrip_protocol(p) if is_url(original) else p


def format_of(path: str, declared: str) -> str | None:
    if declared != "auto":
        return declared
    return SHARD_EXTENSIONS.get(os.path.splitext(path.lower())[1])


class Shard(NamedTuple):
    path: str
    format: str
    size: int = 0  # bytes, from the listing (sizes the run's windows: pipeline/windows.py)


def list_shards(paths: str | Iterable[str], declared_format: str = "auto",
                storage_options: dict[str, Any] | None = None) -> list[Shard]:
    """Expand files, directories and globs into sorted shards (path, format, size).

    Local paths come back absolute. Sizes come from the listing itself (no request per file).
    Raises FileNotFoundError naming the first path that matches nothing, so a typo fails before
    any work starts.
    """
    items = [paths] if isinstance(paths, str) else list(paths)
    found: dict[str, Shard] = {}
    for item in items:
        local = not is_url(item)
        if local:
            item = os.path.abspath(os.path.expanduser(item))
        fs, p = filesystem(item, storage_options)
        if any(ch in p for ch in "*?["):
            matches = fs.glob(p, detail=True)
        elif fs.isdir(p):
            matches = _listable(fs, p)
        elif fs.exists(p):
            matches = {p: fs.info(p)}
        else:
            raise FileNotFoundError(f"input.path: {item} does not exist")
        kept = 0
        for m, info in sorted(matches.items()):
            full = _with_scheme(fs, m, item)
            fmt = format_of(full, declared_format)
            if fmt is not None and info.get("type") != "directory":
                found[full] = Shard(full, fmt, int(info.get("size") or 0))
                kept += 1
        if kept == 0:
            raise FileNotFoundError(f"input.path: {item} holds no .jsonl/.json/.parquet shard")
    return [found[k] for k in sorted(found)]


OUTPUT_MARKER = "_run.json"  # an output persqa_ray wrote (io/outputs.py)


def _listable(fs, root: str) -> dict[str, dict]:
    """Files (path -> listing info) under a directory that can be input: not hidden or
    underscore-named at any level (`_commits/…`, `.tmp` files), and not inside an output
    persqa_ray wrote, wherever it sits."""
    root = root.rstrip("/")
    files = fs.find(root, detail=True)
    outputs = [f[: -len(OUTPUT_MARKER) - 1] for f in files if posixpath.basename(f) == OUTPUT_MARKER]
    kept = {}
    for f, info in files.items():
        rel = f[len(root) + 1:]
        if any(seg.startswith(("_", ".")) for seg in rel.split("/")):
            continue
        if any(f.startswith(o + "/") for o in outputs):
            continue
        kept[f] = info
    return kept


def parent_of(path: str) -> str:
    if is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(path)


def join(base: str, ref: str) -> str:
    if is_url(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, ref))}"
    return os.path.normpath(os.path.join(base, ref))
