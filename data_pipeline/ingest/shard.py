"""One shard of ingest: fetch and process its rows, write its tar, status table and stats
(``data_pipeline.shards.format`` commits them), or redo the failed rows of a committed one."""

from __future__ import annotations

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

_RESERVED_COLUMNS = (
    "key", "url", "caption", "status", "reason", "error", "width", "height", "sha256", "language",
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
                "width": out.width, "height": out.height, "sha256": out.sha256,
                **({"language": out.language} if out.language else {}),
                **_extras(row, cfg),
            }
            yield {"__key__": out.key, out.image_ext: out.image, "txt": str(out.caption), "json": meta}

    write_samples(f, samples())


def _status_table(outcomes: list[Outcome], rows: list[dict], cfg: IngestConfig) -> pa.Table:
    records = []
    for out, row in zip(outcomes, rows):
        records.append({
            "key": out.key,
            "url": out.url,
            "caption": out.caption,
            "status": "success" if out.ok else "failed",
            "reason": out.reason,
            "error": out.error,
            "width": out.width,
            "height": out.height,
            "sha256": out.sha256,
            "language": out.language,
            **_extras(row, cfg),
        })
    return pa.Table.from_pylist(records)


def _read_stats(fs, paths: dict) -> dict:
    with fs.open(paths["stats"], "r") as f:
        return json.load(f)


def _previous_outcomes(fs, paths: dict, keys: list[str]) -> list[Outcome | None]:
    """A committed shard's rows as outcomes, successes with their image bytes; None where a
    row must be fetched again (a success whose image the tar lacks, after a crash between
    the renames of an earlier retry)."""
    import tarfile

    with fs.open(paths["parquet"], "rb") as f:
        status = {r["key"]: r for r in pq.read_table(f).to_pylist()}
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
        out = Outcome(key=key, url=row["url"], caption=row["caption"], reason=row["reason"],
                       error=row["error"], width=row["width"], height=row["height"],
                       sha256=row["sha256"], language=row.get("language"))
        if row["status"] == "success":
            out.image_ext, out.image = images[key]
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
    start = time.monotonic()
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
    failures = Counter(o.reason for o in outcomes if not o.ok)
    stats = {
        "shard_id": shard_id,
        "total": len(outcomes),
        "success": len(outcomes) - sum(failures.values()),
        "failed": sum(failures.values()),
        "failures_by_reason": dict(sorted(failures.items())),
        "fetched": len(todo),
        "retry": previous is not None,
        "bytes_downloaded": sum(outcomes[i].downloaded for i in todo),
        "bytes_written": fs.size(paths["tar"]),
        "elapsed_s": round(time.monotonic() - start, 3),
    }
    atomic_write(fs, paths["stats"], lambda f: f.write(json.dumps(stats, indent=1).encode()))
    return {**stats, "skipped": False}


