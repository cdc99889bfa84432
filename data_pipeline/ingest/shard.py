"""One shard of ingest: fetch and process its rows, write its tar, status table and stats
(``data_pipeline.shards.format`` commits them), or redo the failed rows of a committed one."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.config import IngestConfig
from data_pipeline.ingest.dedup import ProgressReporter, RegistryRef, mark_duplicates
from data_pipeline.ingest.fetch import DomainRateLimiter
from data_pipeline.ingest.rows import Outcome, process_row
from data_pipeline.shards.format import IMAGE_EXTS, atomic_write, shard_paths
from data_pipeline.shards.write import write_samples

# The status table's own columns; an input column of the same name is kept as input_NAME.
# "error" (the message column before img2dataset's error_message) stays reserved, so its
# presence marks a shard written in the older layout (see _previous_outcomes).
_RESERVED_COLUMNS = (
    "key", "url", "caption", "status", "error_message", "width", "height", "original_width",
    "original_height", "reason", "sha256", "language", "error",
)


TRANSIENT_REASONS = frozenset(
    {"connection_error", "timeout", "deadline", "dns_error", "http_408", "http_429", "processing_error"}
)


def is_transient(reason: str | None) -> bool:
    """Failures worth fetching again later (what ``--retry-failed`` retries by default)."""
    return reason is not None and (reason in TRANSIENT_REASONS or
                                   (reason.startswith("http_5") and reason[5:].isdigit()))


def _extras(row: dict, cfg: IngestConfig) -> dict:
    extras = {}
    for name, value in row.items():
        if name in (cfg.url_col, cfg.caption_col):
            continue
        extras[f"input_{name}" if name in _RESERVED_COLUMNS else name] = value
    return extras


def _write_tar(f, outcomes: list[Outcome], rows: list[dict], cfg: IngestConfig) -> None:
    def samples():
        for out, row in zip(outcomes, rows):
            if not out.ok:
                continue
            meta = {
                "key": out.key, "url": out.url, "caption": out.caption, "status": "success",
                "error_message": None, "width": out.width, "height": out.height,
                "original_width": out.original_width, "original_height": out.original_height,
                "sha256": out.sha256, **({"language": out.language} if out.language else {}),
                **_extras(row, cfg),
            }
            yield {"__key__": out.key, out.image_ext: out.image, "txt": str(out.caption), "json": meta}

    write_samples(f, samples())


def img2dataset_status(out: Outcome) -> str:
    """img2dataset's status for an outcome: "success"; "failed_to_resize" when the image's
    bytes arrived (``sha256`` set) but no image was kept (decode, size and aspect rules,
    duplicates); else "failed_to_download" (fetch failures, and rows never fetched: caption
    rules, bad URLs)."""
    if out.ok:
        return "success"
    return "failed_to_resize" if out.sha256 else "failed_to_download"


def _error_message(out: Outcome) -> str | None:
    return None if out.ok else (out.error or out.reason)


def _status_table(outcomes: list[Outcome], rows: list[dict], cfg: IngestConfig) -> pa.Table:
    """One row per input row: img2dataset's columns and meanings, then this project's."""
    records = []
    for out, row in zip(outcomes, rows):
        records.append({
            "key": out.key,
            "url": out.url,
            "caption": out.caption,
            "status": img2dataset_status(out),
            "error_message": _error_message(out),
            "width": out.width,
            "height": out.height,
            "original_width": out.original_width,
            "original_height": out.original_height,
            "reason": out.reason,
            "sha256": out.sha256,
            "language": out.language,
            **_extras(row, cfg),
        })
    return pa.Table.from_pylist(records)


def _counts(outcomes: list[Outcome]) -> dict:
    """The stats file's counts: this project's (by reason class), then img2dataset's."""
    failures = Counter(o.reason for o in outcomes if not o.ok)
    statuses = Counter(img2dataset_status(o) for o in outcomes)
    return {
        "total": len(outcomes),
        "success": len(outcomes) - sum(failures.values()),
        "failed": sum(failures.values()),
        "failures_by_reason": dict(sorted(failures.items())),
        "count": len(outcomes),
        "successes": statuses["success"],
        "failed_to_download": statuses["failed_to_download"],
        "failed_to_resize": statuses["failed_to_resize"],
        "status_dict": dict(Counter(_error_message(o) or "success" for o in outcomes).most_common()),
    }


def _read_stats(fs, paths: dict) -> dict:
    with fs.open(paths["stats"], "r") as f:
        return json.load(f)


def _row_outcome(row: dict, old_layout: bool) -> Outcome:
    """A status-table row as an outcome. The older layout (an ``error`` column, status
    "failed") kept the original size in width/height; the stored size is filled in from
    the image by the caller."""
    out = Outcome(key=row["key"], url=row["url"], caption=row["caption"], reason=row["reason"],
                  sha256=row["sha256"], language=row.get("language"))
    if old_layout:
        out.error, out.original_width, out.original_height = row["error"], row["width"], row["height"]
    else:
        out.error, out.width, out.height = row["error_message"], row["width"], row["height"]
        out.original_width, out.original_height = row["original_width"], row["original_height"]
    return out


def _stored_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        return img.size


def _previous_outcomes(fs, paths: dict, keys: list[str]) -> list[Outcome | None]:
    """A committed shard's rows as outcomes, successes with their image bytes; None where a
    row must be fetched again (a success whose image the tar lacks, after a crash between
    the renames of an earlier retry). Reads either status-table layout (``_row_outcome``)."""
    import tarfile

    with fs.open(paths["parquet"], "rb") as f:
        table = pq.read_table(f)
    old_layout = "error" in table.column_names
    status = {r["key"]: r for r in table.to_pylist()}
    images: dict[str, tuple[str, bytes]] = {}
    with fs.open(paths["tar"], "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            if member.isfile() and ext in IMAGE_EXTS:
                images[key] = (ext, tar.extractfile(member).read())
    previous: list[Outcome | None] = []
    for key in keys:
        row = status.get(key)
        if row is None or (row["status"] == "success" and key not in images):
            previous.append(None)
            continue
        out = _row_outcome(row, old_layout)
        if row["status"] == "success":
            out.image_ext, out.image = images[key]
            if old_layout:
                out.width, out.height = _stored_size(out.image)
        else:
            out.reason = out.reason or "unknown"
        previous.append(out)
    return previous


def _wants_retry(out: Outcome | None, retry_reasons: frozenset[str] | None) -> bool:
    if out is None:
        return True
    if out.ok:
        return False
    return is_transient(out.reason) if not retry_reasons else (
        "all" in retry_reasons or out.reason in retry_reasons)


def _process_rows(rows: list[dict], keys: list[str], todo: list[int], outcomes: list,
                  cfg: IngestConfig, registry, shard_id: int) -> None:
    """Process the rows ``todo`` on ``cfg.threads`` threads, into ``outcomes`` in place."""
    rate = cfg.fetch.rate_limit_per_domain
    limiter = DomainRateLimiter(rate) if rate > 0 else None
    reporter = ProgressReporter(registry, shard_id)

    # Downloads overlap; decoding takes turns (decode_threads at once): with all 16
    # threads decoding on the task's one core, two tasks on two cores took ~12% longer
    # on the benchmark corpus than with one decoder each (cache and GIL contention).
    cpu_slots = threading.BoundedSemaphore(cfg.decode_threads)

    def work(i: int) -> None:
        outcomes[i] = process_row(rows[i], keys[i], cfg, limiter, cpu_slots)
        reporter.add(outcomes[i].ok)

    with ThreadPoolExecutor(max_workers=max(1, min(cfg.threads, len(todo) or 1))) as pool:
        list(pool.map(work, todo))


def ingest_shard(rows: list[dict] | pa.Table, shard_id: int, output_dir: str, cfg: IngestConfig, *,
                 registry=None, retry_reasons: frozenset[str] | None = None,
                 retry_failed: bool = False) -> dict:
    """Download, filter and write one shard; returns its stats (``skipped`` if committed).

    With ``retry_failed`` a committed shard is redone in place: only its failed rows whose
    reason is in ``retry_reasons`` (default: the transient ones, see ``is_transient``; "all"
    for every reason) are fetched again, the rest is carried over from the shard's files.
    ``registry``: the run's ``DedupRegistry``, its actor or a ``RegistryRef`` to it (None:
    duplicates only within the shard, no live progress)."""
    start, start_time = time.monotonic(), time.time()
    if isinstance(registry, RegistryRef):
        registry = registry.resolve()
    fs, root = fsspec.core.url_to_fs(output_dir)
    paths = shard_paths(root, shard_id)
    if isinstance(rows, pa.Table):
        rows = rows.to_pylist()
    width = max(4, len(str(cfg.shard_size - 1)))
    keys = [f"{shard_id:05d}{i:0{width}d}" for i in range(len(rows))]
    previous = None
    if fs.exists(paths["stats"]):
        if not retry_failed:
            return {**_read_stats(fs, paths), "skipped": True}
        previous = _previous_outcomes(fs, paths, keys)
    todo = [i for i in range(len(rows)) if previous is None or _wants_retry(previous[i], retry_reasons)]
    if previous is not None and not todo:
        return {**_read_stats(fs, paths), "skipped": True}
    fs.makedirs(root, exist_ok=True)

    outcomes: list[Outcome | None] = list(previous) if previous is not None else [None] * len(rows)
    _process_rows(rows, keys, todo, outcomes, cfg, registry, shard_id)
    if cfg.dedup:
        mark_duplicates(outcomes, registry, shard_id)

    atomic_write(fs, paths["tar"], lambda f: _write_tar(f, outcomes, rows, cfg))
    table = _status_table(outcomes, rows, cfg)
    atomic_write(fs, paths["parquet"], lambda f: pq.write_table(table, f))
    stats = {
        "shard_id": shard_id,
        **_counts(outcomes),
        "fetched": len(todo),
        "retry": previous is not None,
        "bytes_downloaded": sum(outcomes[i].downloaded for i in todo),
        "bytes_written": fs.size(paths["tar"]),
        "elapsed_s": round(time.monotonic() - start, 3),
        "start_time": start_time,
        "end_time": time.time(),
    }
    stats["duration"] = stats["end_time"] - start_time
    atomic_write(fs, paths["stats"], lambda f: f.write(json.dumps(stats, indent=1).encode()))
    return {**stats, "skipped": False}


