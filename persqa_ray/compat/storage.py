"""DataFlow-style step storage: `FileStorage` and its base `DataFlowStorage`.

Follows DataFlow-MM's `dataflow/utils/storage.py` (OpenDCAI/DataFlow-MM a5d48e0, 2026-03-10):
step N reads the file step N-1 wrote: step 0 is `first_entry_file_name`, step N>0 is
`cache_path/{file_name_prefix}_step{N}.{cache_type}`; `write` writes step N+1 and returns its
path; `read()` or `write()` before the first `step()` raises, as DataFlow-MM's does (there, a
write before `step()` would overwrite the input file itself).
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from typing import Any, Optional, Union

import pandas as pd

from persqa_ray.export import jsonl_line

CACHE_TYPES = ("jsonl", "json", "parquet", "csv")
NO_STEP = ("You must call storage.step() before reading or writing data. Please call storage.step() first "
           "for each operator step.")  # DataFlow-MM's own message


class DataFlowStorage(ABC):
    """What an operator needs from storage (users' own storages subclass this or duck-type it)."""

    @abstractmethod
    def read(self, output_type: str = "dataframe") -> Union[pd.DataFrame, list[dict]]: ...

    @abstractmethod
    def write(self, data: Union[pd.DataFrame, list[dict]]) -> Any: ...


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rows.append(json.loads(raw.decode("utf-8", errors="replace")))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
    return rows


def _jsonable_cell(v: Any) -> Any:
    if hasattr(v, "tolist"):  # numpy arrays / scalars from pandas or pyarrow
        v = v.tolist()
    if isinstance(v, float) and v != v:  # pandas' NaN for a missing value: JSON has no NaN
        return None
    return v


def pq_write_rows(rows: list[dict], path: str) -> None:
    """Parquet needs one type per column: a column that mixes types across rows (the image
    column as a list here and a bare string there) is stored as JSON text instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        names = list(dict.fromkeys(k for r in rows for k in r))
        cols = {}
        for n in names:
            values = [r.get(n) for r in rows]
            try:
                cols[n] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                cols[n] = pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values])
        table = pa.table(cols)
    pq.write_table(table, path)


def _read_json(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # many ".json" datasets are really JSON lines
    return data if isinstance(data, list) else [data]


def _read_csv(path: str) -> list[dict]:
    df = pd.read_csv(path)
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    for r in rows:  # lists/dicts were written as JSON text
        for k, v in r.items():
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    r[k] = json.loads(v)
                except json.JSONDecodeError:
                    pass
    return rows


def _read_parquet(path: str) -> list[dict]:
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()


_READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
            ".csv": _read_csv}


def _write_rows(rows: list[dict], path: str, cache_type: str) -> None:
    if cache_type == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(jsonl_line(r))
    elif cache_type == "json":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=2)
    elif cache_type == "parquet":
        pq_write_rows(rows, path)
    else:  # csv: nested values as JSON text so they survive a round trip
        flat = [{k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                 for k, v in r.items()} for r in rows]
        pd.DataFrame(flat).to_csv(path, index=False)


class FileStorage(DataFlowStorage):
    """DataFlow-MM's constructor and defaults. `media_key` / `media_type` (in DataFlow-MM's English
    documentation, not in its current source) are accepted and change nothing: the operator's
    `multi_modal_key` names the image column. `pickle` is refused: reading a pickle runs code."""

    def __init__(self, first_entry_file_name: str, cache_path: str = "./cache",
                 file_name_prefix: str = "dataflow_cache", cache_type: str = "jsonl",
                 media_key: Optional[str] = None, media_type: Optional[str] = None):
        if cache_type == "pickle":
            raise ValueError("cache_type 'pickle' is not supported: loading a pickle can run arbitrary code; "
                             "use 'parquet' for a binary cache")
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"cache_type: {cache_type!r} is not one of {CACHE_TYPES}")
        del media_key, media_type  # accepted for the documented example; nothing reads them
        self.first_entry_file_name = first_entry_file_name
        self.cache_path = cache_path
        self.file_name_prefix = file_name_prefix
        self.cache_type = cache_type
        self.operator_step = -1

    def step(self) -> "FileStorage":
        self.operator_step += 1
        return self

    def reset(self) -> "FileStorage":
        self.operator_step = -1
        return self

    def _step_path(self, step: int) -> str:
        if step < 0 or self.operator_step < 0:
            raise ValueError(NO_STEP)
        if step == 0:
            return self.first_entry_file_name
        return os.path.join(self.cache_path, f"{self.file_name_prefix}_step{step}.{self.cache_type}")

    @property
    def read_path(self) -> str:
        """The file the current step reads (absolute); raises before the first step()."""
        return os.path.abspath(self._step_path(self.operator_step))

    def read(self, output_type: str = "dataframe"):
        if output_type not in ("dataframe", "dict"):
            raise ValueError(f"output_type must be 'dataframe' or 'dict', not {output_type!r}")
        path = self.read_path
        ext = os.path.splitext(path)[1].lower()
        if ext not in _READERS:
            raise ValueError(f"{path}: unsupported file type {ext!r}")
        rows = _READERS[ext](path)
        return pd.DataFrame(rows) if output_type == "dataframe" else rows

    def write(self, data) -> str:
        path = self._step_path(self.operator_step + 1)
        rows = data.to_dict("records") if isinstance(data, pd.DataFrame) else list(data)
        rows = [{k: _jsonable_cell(v) for k, v in r.items()} for r in rows]
        os.makedirs(self.cache_path, exist_ok=True)
        tmp = path + ".tmp"
        _write_rows(rows, tmp, self.cache_type)
        os.replace(tmp, path)  # never leave a half-written step file under the real name
        return path
