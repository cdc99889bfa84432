"""Read a URL+caption table (parquet, csv or jsonl) from any fsspec path."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def _format_of(path: str) -> str:
    name = path.split("?")[0].lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for fmt in ("parquet", "csv", "jsonl", "json"):
        if name.endswith("." + fmt):
            return fmt
    raise ValueError(f"{path}: unknown table format; expected .parquet, .csv, .jsonl or .json")


def _read_json(f, path: str) -> pa.Table:
    try:
        return pajson.read_json(f)  # newline-delimited JSON
    except pa.ArrowInvalid:
        f.seek(0)
        rows = json.load(f)  # fall back to one JSON array of objects
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected JSON lines or a JSON array of objects") from None
        return pa.Table.from_pylist(rows)


def read_table(path_or_url: str, *, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """Load the table and check that ``url_col`` and ``caption_col`` are present.

    Raises ``ValueError`` naming the file (and the missing column with the columns present).
    """
    fmt = _format_of(path_or_url)
    compression = None if fmt == "parquet" else "infer"
    try:
        with fsspec.open(path_or_url, "rb", compression=compression) as f:
            if fmt == "parquet":
                table = pq.read_table(f)
            elif fmt == "csv":
                table = pacsv.read_csv(f)
            else:
                table = _read_json(f, path_or_url)
    except FileNotFoundError:
        raise ValueError(f"{path_or_url}: file not found") from None
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path_or_url}: cannot parse as {fmt}: {e}") from None
    for col in (url_col, caption_col):
        if col not in table.column_names:
            raise ValueError(
                f"{path_or_url}: no column {col!r}; columns present: {table.column_names}"
            )
    return table
