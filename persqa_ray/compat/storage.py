"""DataFlow-style step storage: `FileStorage` and its base `DataFlowStorage`.

Step N reads the file step N-1 wrote: step 0 is `first_entry_file_name`, step N>0 is
`cache_path/{file_name_prefix}_step{N}.{cache_type}`; `write` writes step N+1 and returns its path.
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from typing import Any, Union

import pandas as pd

CACHE_TYPES = ("jsonl", "json", "parquet", "csv")


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


class FileStorage(DataFlowStorage):
    def __init__(self, first_entry_file_name: str, cache_path: str = "./cache",
                 file_name_prefix: str = "dataflow_cache_step", cache_type: str = "jsonl",
                 media_key: str = "image", media_type: str = "image"):
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"cache_type: {cache_type!r} is not one of {CACHE_TYPES}")
        self.first_entry_file_name = first_entry_file_name
        self.cache_path = cache_path
        self.file_name_prefix = file_name_prefix
        self.cache_type = cache_type
        self.media_key = media_key
        self.media_type = media_type
        self.operator_step = -1

    def step(self) -> "FileStorage":
        self.operator_step += 1
        return self

    def _step_path(self, step: int) -> str:
        return os.path.join(self.cache_path, f"{self.file_name_prefix}_step{step}.{self.cache_type}")

    @property
    def read_path(self) -> str:
        """The file the current step reads (absolute)."""
        step = max(self.operator_step, 0)
        return os.path.abspath(self.first_entry_file_name if step == 0 else self._step_path(step))

    def _records(self) -> list[dict]:
        path = self.read_path
        ext = os.path.splitext(path)[1].lower()
        if ext in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                return _read_jsonl(path)  # many ".json" datasets are really JSON lines
            return data if isinstance(data, list) else [data]
        if ext == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        if ext == ".csv":
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
        raise ValueError(f"{path}: unsupported file type {ext!r}")

    def read(self, output_type: str = "dataframe"):
        rows = self._records()
        if output_type == "dataframe":
            return pd.DataFrame(rows)
        if output_type == "dict":
            return rows
        raise ValueError(f"output_type must be 'dataframe' or 'dict', not {output_type!r}")

    def write(self, data) -> str:
        rows = data.to_dict("records") if isinstance(data, pd.DataFrame) else list(data)
        rows = [{k: _jsonable_cell(v) for k, v in r.items()} for r in rows]
        os.makedirs(self.cache_path, exist_ok=True)
        path = self._step_path(self.operator_step + 1)
        tmp = path + ".tmp"
        if self.cache_type == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        elif self.cache_type == "json":
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(rows, f, ensure_ascii=False, indent=2)
        elif self.cache_type == "parquet":
            pq_write_rows(rows, tmp)
        else:  # csv: nested values as JSON text so they survive a round trip
            flat = [{k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                     for k, v in r.items()} for r in rows]
            pd.DataFrame(flat).to_csv(tmp, index=False)
        os.replace(tmp, path)  # never leave a half-written step file under the real name
        return path
