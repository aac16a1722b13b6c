"""What an output is, and the rules that keep a run from destroying data.

An output persqa_ray wrote carries `_run.json` (our marker, with the run's identity). Rules:
- `output.path` may never be an input shard's directory or any parent of an input;
- `--overwrite` refuses the current directory, `/`, the home directory, a bucket root and any
  parent or child of an input, and removes only an output that carries our marker (or an empty
  directory) — and of it only the files this job writes (`part-*.parquet`, `_commits/`, `_run.json`,
  `_summary.json`); anything else found there is left and named;
- input listing skips every directory that carries our marker (io/filesystems.py).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from typing import Optional

from persqa_ray.config import ConfigError
from persqa_ray.io.filesystems import is_url

log = logging.getLogger(__name__)

RUN_FILE = "_run.json"
SUMMARY_FILE = "_summary.json"
LEASE_FILE = "_lease.json"
CONCEPTS_FILE = "_concepts.json"  # the run's concept registry: the RAP export's database comes from it
MARKER_KEY = "persqa_ray_output"
# Settings that decide what a row's output is: a resume with other values would mix two datasets.
# engine.kind decides how the tag is forced (in-process vLLM vs a server); engine.base_url does not
# (a server that moved must not block a retry), so it is not part of the identity.
RUN_IDENTITY_FIELDS = ("prompt", "engine.kind", "engine.model", "engine.max_tokens", "engine.temperature",
                       "engine.top_p", "engine.guided_prefix", "engine.structured",
                       "output.pers_qa_format", "output.partition_by", "input.image_column", "input.id_column",
                       "input.concept_column", "input.subject_type_column")
_OUR_DATA_FILE = re.compile(r"^\.?part-[0-9a-f]+-[0-9a-f]+-\d+\.parquet(\.tmp)?$")
_OUR_TOP_FILES = {RUN_FILE, SUMMARY_FILE, LEASE_FILE, CONCEPTS_FILE, f".{RUN_FILE}.tmp", f".{SUMMARY_FILE}.tmp",
                  f".{LEASE_FILE}.tmp", f".{CONCEPTS_FILE}.tmp"}


def is_our_output(fs, root: str) -> bool:
    return fs.exists(f"{root}/{RUN_FILE}")


def run_identity(cfg) -> dict:
    dumped = cfg.model_dump(mode="json")
    ident = {}
    for name in RUN_IDENTITY_FIELDS:
        node = dumped
        for k in name.split("."):
            node = node.get(k) if isinstance(node, dict) else None  # a field of another engine kind: None
        ident[name] = node
    return ident


def _norm_local(p: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(p)))


def _norm_url(p: str) -> str:
    scheme, rest = p.split("://", 1)
    return f"{scheme.lower()}://{posixpath.normpath(rest).strip('/')}"


def _norm(p: str) -> str:
    return _norm_url(p) if is_url(p) else _norm_local(p)


def _inside(child: str, parent: str) -> bool:
    """child == parent or below it (both normalized)."""
    return child == parent or child.startswith(parent.rstrip("/" if is_url(parent) else os.sep)
                                               + ("/" if is_url(parent) else os.sep))


def input_anchors(input_path, shards: list[tuple[str, str]]) -> list[str]:
    """Normalized input locations: each configured path (a glob: its fixed prefix) and each
    shard's directory."""
    items = [input_path] if isinstance(input_path, str) else list(input_path)
    out = []
    for item in items:
        cut = min([i for i in (item.find(c) for c in "*?[") if i >= 0], default=-1)
        base = item if cut < 0 else (item[:cut].rsplit("/", 1)[0] if "/" in item[:cut] else ".")
        base = base or "/"
        out.append(_norm(base))
    for shard, *_ in shards:
        out.append(_norm(shard.rsplit("/", 1)[0] if is_url(shard) else os.path.dirname(shard)))
    return sorted(set(out))


def check_output_location(out_path: str, input_path, shards: list[tuple[str, str]], overwrite: bool) -> None:
    """Refuse output paths that could destroy or swallow input (ConfigError naming the reason)."""
    out = _norm(out_path)
    anchors = input_anchors(input_path, shards)
    for anchor in sorted(anchors, key=lambda a: a != out):  # "is the input directory" first
        if _inside(anchor, out):
            what = "the input directory" if anchor == out else "a parent of the input"
            raise ConfigError(f"output.path: {out_path} is {what} ({anchor}); "
                              "writing there would mix output with input: choose another directory")
    for anchor in anchors:
        if overwrite and _inside(out, anchor):
            raise ConfigError(f"output.path: {out_path} is inside the input ({anchor}); --overwrite "
                              "refuses to delete anything inside an input directory")
    if not overwrite:
        return
    if is_url(out_path):
        if "/" not in out.split("://", 1)[1]:
            raise ConfigError(f"output.path: {out_path} is a bucket root; --overwrite refuses to clear it")
        return
    forbidden = {"/": "the filesystem root", _norm_local(os.getcwd()): "the current directory",
                 _norm_local("~"): "the home directory"}
    if out in forbidden:
        raise ConfigError(f"output.path: {out_path} is {forbidden[out]}; --overwrite refuses to clear it")
    for parent, what in ((_norm_local(os.getcwd()), "the current directory"), (_norm_local("~"), "the home directory")):
        if _inside(parent, out):
            raise ConfigError(f"output.path: {out_path} contains {what}; --overwrite refuses to clear it")


def clear_output(fs, root: str) -> list[str]:
    """--overwrite: remove what persqa_ray wrote in an output (which must carry our marker or be
    empty). Returns the paths of anything else, which is left in place."""
    if not fs.exists(root):
        return []
    entries = [e for e in fs.find(root, withdirs=False) if not e.endswith(f"/{LEASE_FILE}")]
    if entries and not is_our_output(fs, root):
        raise ConfigError(f"output.path: {root} is not empty and was not written by persqa-ray "
                          f"(no {RUN_FILE}); --overwrite only clears an output of ours or an empty directory")
    foreign = []
    for path in entries:
        rel = path[len(root) + 1:]
        name = rel.rsplit("/", 1)[-1]
        top = rel.split("/", 1)[0]
        if top in ("_commits", "_work") or (rel == name and name in _OUR_TOP_FILES and name != LEASE_FILE) \
                or (_OUR_DATA_FILE.match(name) and all("=" in s for s in rel.split("/")[:-1])):
            fs.rm(path)
        elif name != LEASE_FILE:
            foreign.append(path)
    # Empty directories left behind (partition directories, _commits/…), deepest first.
    if not is_url(root):
        for dirpath, _, _ in sorted(os.walk(root), key=lambda x: -len(x[0])):
            if dirpath != root and not os.listdir(dirpath):
                os.rmdir(dirpath)
    if foreign:
        log.warning("--overwrite left %d file(s) persqa-ray did not write: %s", len(foreign), foreign[:5])
    return foreign


def write_run_file(fs, root: str, ident: dict, limits: Optional[dict] = None, url: bool = False) -> None:
    """The marker with the run's identity and the image limits of the latest run (the report
    opens images only within these). Written whole (tmp + rename; one PUT on an object store)."""
    from persqa_ray.io.commits import _write_json
    body = {MARKER_KEY: True, **ident}
    if limits:
        body["limits"] = limits
    _write_json(fs, f"{root}/{RUN_FILE}", body, url)


def write_concepts(out, registry) -> None:
    """The run's concepts: registered ones (name, tag, class phrase, subject type, reference images,
    info) and those found in the input (with the subject type of most of their rows). O(concepts),
    rewritten by every run (what a later export describes)."""
    from persqa_ray.io.commits import _write_json, output_root
    fs, root = output_root(out.path, out.storage_options)
    registered = {c.name for c in registry.registered}
    found = [c for c in (registry.resolve(n)[0] for n in registry.known if n not in registered) if c is not None]
    body = [{"name": c.name, "tag": c.tag, "class_phrase": c.class_phrase, "subject_type": registry.subject_type_of(c),
             "reference_images": list(c.reference_images), "info": c.info} for c in [*registry.registered, *found]]
    _write_json(fs, f"{root}/{CONCEPTS_FILE}", body, is_url(out.path))


def read_concepts(path: str, storage_options: Optional[dict] = None) -> list[dict]:
    from persqa_ray.io.commits import output_root, read_json
    fs, root = output_root(path, storage_options)
    return read_json(fs, f"{root}/{CONCEPTS_FILE}") or []


def read_limits(path: str, storage_options: Optional[dict] = None) -> Optional[dict]:
    from persqa_ray.io.commits import output_root, read_json
    fs, root = output_root(path, storage_options)
    return (read_json(fs, f"{root}/{RUN_FILE}") or {}).get("limits")


def check_identity(fs, root: str, ident: dict, out_path: str) -> Optional[dict]:
    """Refuse to resume an output made with other settings; None when there is no run file."""
    path = f"{root}/{RUN_FILE}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        before = json.load(f)
    # A field an older version did not record is not a change.
    changed = [k for k in RUN_IDENTITY_FIELDS if k in before and before[k] != ident[k]]
    if changed:
        raise ConfigError(f"output.path: {out_path} holds a run made with other settings ({', '.join(changed)}); "
                          "resuming would mix two datasets: use another path or --overwrite")
    return before


def open_output(cfg, shards: list[tuple[str, str]], limits: Optional[dict] = None):
    """Everything before a run touches its output, in this order: refuse a dangerous path, take the
    lease (a second live run stops here), clear it on --overwrite, check or write the run identity.
    Returns the held Lease; the caller releases it."""
    from persqa_ray.io.commits import output_root
    from persqa_ray.io.lease import Lease

    out = cfg.output
    check_output_location(out.path, cfg.input.path, shards, out.overwrite)
    fs, root = output_root(out.path, out.storage_options)
    if not is_url(out.path) and os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"output.path: {out.path} is a file, not a directory")
    lease = Lease(fs, root, out.path, out.lease_ttl_s).acquire()
    try:
        if out.overwrite:
            clear_output(fs, root)
        ident = run_identity(cfg)
        before = check_identity(fs, root, ident, out.path)
        if before is None:
            foreign = [f for f in (fs.find(root) if fs.exists(root) else []) if f.endswith(".parquet")]
            if foreign:
                raise ConfigError(f"output.path: {out.path} holds Parquet files persqa-ray did not write "
                                  f"({foreign[0]}); use another path")
        if before is None or (limits and before.get("limits") != limits):
            write_run_file(fs, root, {**(before or {}), **ident}, limits, url=is_url(out.path))
    except BaseException:
        lease.release()
        raise
    return lease


def without_outputs(shards: list, out_path: str) -> list:
    """Input shards minus anything inside output.path (an output inside the input directory)."""
    out = _norm(out_path)
    return [s for s in shards if not _inside(_norm(s[0]), out)]
