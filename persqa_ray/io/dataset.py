"""Reading an output back: only files of trusted commit records, partition columns as written.

`iter_output` streams one commit record's rows at a time (memory bounded by a block, whatever
the output's size): the report and the export use it. `read_output` concatenates them for small
outputs, tests and notebooks. Rows an error retry replaced (`supersedes` in a later record) are
never returned, so no reader sees an old error row next to its replacement.
"""
from __future__ import annotations

from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from persqa_ray.io.commits import iter_records, output_root, read_data_file
from persqa_ray.io.outputs import is_our_output


def _superseded(fs, root: str) -> dict[str, set[str]]:
    """record uid -> row ids a later record replaced (error retries; few)."""
    out: dict[str, set[str]] = {}
    for rec in iter_records(fs, root):
        for uid, sup in rec.get("supersedes", {}).items():
            out.setdefault(uid, set()).update(sup["row_ids"])
    return out


def iter_output(path: str, columns: Optional[list[str]] = None,
                storage_options: Optional[dict] = None) -> Iterator[pa.Table]:
    """One table per commit record (or per file for a dataset persqa_ray did not write)."""
    fs, root = output_root(path, storage_options)
    if not fs.exists(root):
        return
    if not is_our_output(fs, root):
        # Some other tool's Parquet dataset: every data file counts.
        for f in sorted(fs.find(root)):
            rel = f[len(root) + 1:]
            if f.endswith(".parquet") and not any(s.startswith((".", "_")) for s in rel.split("/")):
                yield read_data_file(fs, root, rel, columns)
        return
    hidden = _superseded(fs, root)
    need = list(columns) + ["row_id"] if columns and "row_id" not in columns else columns
    for rec in iter_records(fs, root):
        tables = [read_data_file(fs, root, f["path"], need) for f in rec["files"]]
        if not tables:
            continue
        t = pa.concat_tables(tables, promote_options="permissive")
        if rec["uid"] in hidden:
            t = t.filter(pc.invert(pc.is_in(t.column("row_id"), pa.array(sorted(hidden[rec["uid"]]), pa.string()))))
        if columns and "row_id" not in columns:
            t = t.drop_columns(["row_id"])
        yield t


def read_output(path: str, columns: Optional[list[str]] = None,
                storage_options: Optional[dict] = None) -> pa.Table:
    """The whole output as one table (for small outputs, tests, notebooks)."""
    tables = list(iter_output(path, columns, storage_options))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in (columns or ["row_id"])})
    t = pa.concat_tables(tables, promote_options="permissive")
    if columns:
        t = t.select([c for c in columns if c in t.column_names])
    return t


def dataset_files(path: str, storage_options: Optional[dict] = None) -> list[str]:
    """Relative paths of the trusted data files (for tools that want a pyarrow dataset)."""
    fs, root = output_root(path, storage_options)
    return [f["path"] for rec in iter_records(fs, root) for f in rec["files"]]

