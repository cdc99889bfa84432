"""Read a URL+caption table (parquet, csv or jsonl, optionally compressed) from any fsspec
path, whole or streamed in shard-sized pieces."""

from __future__ import annotations

import json
from typing import Iterator

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
    _check_columns(table.column_names, path_or_url, url_col, caption_col)
    return table


def _open(path_or_url: str, fmt: str):
    compression = None if fmt == "parquet" else "infer"
    return fsspec.open(path_or_url, "rb", compression=compression)


def _batches(f, fmt: str, path: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows)
    elif fmt == "csv":
        yield from pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 22))
    else:
        try:
            reader = pajson.open_json(f)
            first = reader.read_next_batch()
        except (pa.ArrowInvalid, StopIteration) as e:
            if isinstance(e, StopIteration):
                return
            f.seek(0)  # not JSON lines: one JSON array of objects, read whole
            yield from _read_json(f, path).to_batches(batch_rows)
            return
        yield first
        yield from reader


def iter_shards(path_or_url: str, shard_size: int, *, url_col: str = "url",
                caption_col: str = "caption") -> Iterator[pa.Table]:
    """The table cut into consecutive tables of ``shard_size`` rows (the last may be shorter),
    streamed: only about one shard of rows is in memory at a time, however long the table."""
    fmt = _format_of(path_or_url)
    pending: list[pa.RecordBatch] = []
    held = 0
    checked = False
    try:
        with _open(path_or_url, fmt) as f:
            for batch in _batches(f, fmt, path_or_url, shard_size):
                if not checked:
                    _check_columns(batch.schema.names, path_or_url, url_col, caption_col)
                    checked = True
                while batch.num_rows:
                    take = min(batch.num_rows, shard_size - held)
                    pending.append(batch.slice(0, take))
                    held += take
                    batch = batch.slice(take)
                    if held == shard_size:
                        yield _combine(pending)
                        pending, held = [], 0
    except FileNotFoundError:
        raise ValueError(f"{path_or_url}: file not found") from None
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path_or_url}: cannot parse as {fmt}: {e}") from None
    if pending:
        yield _combine(pending)


def _combine(batches: list[pa.RecordBatch]) -> pa.Table:
    # Later blocks of a CSV/JSON file may infer a wider type (int then null, say).
    return pa.Table.from_batches(batches).combine_chunks() if len({b.schema for b in batches}) == 1 \
        else pa.concat_tables([pa.Table.from_batches([b]) for b in batches], promote_options="permissive")


def count_rows(path_or_url: str) -> int | None:
    """Rows in the table when that is cheap to know (parquet metadata), else None."""
    if _format_of(path_or_url) != "parquet":
        return None
    with _open(path_or_url, "parquet") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _check_columns(names: list[str], path: str, url_col: str, caption_col: str) -> None:
    for col in (url_col, caption_col):
        if col not in names:
            raise ValueError(f"{path}: no column {col!r}; columns present: {names}")
