"""Read a URL+caption table (parquet, csv, tsv or jsonl, optionally compressed) from any
fsspec path, whole or streamed in shard-sized pieces, or only its columns (``table_schema``)."""

from __future__ import annotations

import json
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from data_pipeline.config import InputError

_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


class TableError(InputError):
    """The input table cannot be used as given (not found, unknown format, unparsable, a
    missing column): the user's input is wrong, so the CLI reports it as a usage error."""


def _format_of(path: str) -> str:
    name = path.split("?")[0].lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for fmt in ("parquet", "csv", "tsv", "jsonl", "json"):
        if name.endswith("." + fmt):
            return fmt
    raise TableError(f"{path}: unknown table format; expected .parquet, .csv, .tsv, .jsonl or .json")


def _csv_options(fmt: str) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")


def _read_json(f, path: str) -> pa.Table:
    try:
        return pajson.read_json(f)  # newline-delimited JSON
    except pa.ArrowInvalid:
        f.seek(0)
        rows = json.load(f)  # fall back to one JSON array of objects
        if not isinstance(rows, list):
            raise TableError(f"{path}: expected JSON lines or a JSON array of objects") from None
        return pa.Table.from_pylist(rows)


def read_table(path_or_url: str, *, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """Load the table and check that ``url_col`` and ``caption_col`` are present.

    Raises ``TableError`` naming the file (and the missing column with the columns present).
    """
    fmt = _format_of(path_or_url)
    compression = None if fmt == "parquet" else "infer"
    try:
        with fsspec.open(path_or_url, "rb", compression=compression) as f:
            if fmt == "parquet":
                table = pq.read_table(f)
            elif fmt in ("csv", "tsv"):
                table = pacsv.read_csv(f, parse_options=_csv_options(fmt))
            else:
                table = _read_json(f, path_or_url)
    except FileNotFoundError:
        raise TableError(f"{path_or_url}: file not found") from None
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TableError(f"{path_or_url}: cannot parse as {fmt}: {e}") from None
    check_columns(path_or_url, table.column_names, url_col=url_col, caption_col=caption_col)
    return table


def _open(path_or_url: str, fmt: str):
    compression = None if fmt == "parquet" else "infer"
    return fsspec.open(path_or_url, "rb", compression=compression)


def _batches(f, fmt: str, path: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows)
    elif fmt in ("csv", "tsv"):
        yield from pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 22),
                                  parse_options=_csv_options(fmt))
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
                    check_columns(path_or_url, batch.schema.names, url_col=url_col, caption_col=caption_col)
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
        raise TableError(f"{path_or_url}: file not found") from None
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TableError(f"{path_or_url}: cannot parse as {fmt}: {e}") from None
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


def table_schema(path_or_url: str) -> tuple[list[str], bool]:
    """(column names, whether the table has a row), from the file's head only: the parquet
    footer, or the first block of a csv/tsv/jsonl file (a JSON array is read whole). An
    empty file is a table with no columns and no rows. Raises ``TableError``."""
    fmt = _format_of(path_or_url)
    try:
        with _open(path_or_url, fmt) as f:
            if fmt == "parquet":
                parquet = pq.ParquetFile(f)
                return parquet.schema_arrow.names, parquet.metadata.num_rows > 0
            if not f.read(4096).strip():
                return [], False
            f.seek(0)
            if fmt in ("csv", "tsv"):
                reader = pacsv.open_csv(f, parse_options=_csv_options(fmt))
                first = next(iter(reader), None)
                return reader.schema.names, first is not None and first.num_rows > 0
            first = next(_batches(f, fmt, path_or_url, 1024), None)
            return (first.schema.names, first.num_rows > 0) if first is not None else ([], False)
    except FileNotFoundError:
        raise TableError(f"{path_or_url}: file not found") from None
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TableError(f"{path_or_url}: cannot parse as {fmt}: {e}") from None


def check_columns(path: str, names: list[str], *, url_col: str = "url", caption_col: str = "caption") -> None:
    """Raises ``TableError`` naming the file and the first of the two columns it lacks."""
    for col in (url_col, caption_col):
        if col not in names:
            key = "url_col" if col == url_col else "caption_col"
            raise TableError(f"{path}: no column {col!r} (data.ingest.{key}); columns present: {names}")
