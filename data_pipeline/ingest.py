"""Turn a URL+caption table into webdataset shards: one Ray task per shard of N rows.

Per shard ``{id:05d}`` in ``output_dir``: ``.tar`` (image, ``txt`` caption, ``json``
metadata per sample), ``.parquet`` (one row per input row, success or failure with its
reason) and ``_stats.json``. Each file is written under a temporary name and renamed;
``_stats.json`` goes last, so its presence means the shard is committed and a rerun
skips it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from data_pipeline.config import IngestConfig
from data_pipeline.fetch import DomainRateLimiter, fetch
from data_pipeline.table import read_table

_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_RESERVED_COLUMNS = (
    "key", "url", "caption", "status", "reason", "error", "width", "height", "sha256",
)


class Rejected(Exception):
    """A sample that cannot be kept; ``reason`` is a bounded snake_case label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


# ---------------------------------------------------------------- one image


def decode_image(data: bytes, cfg: IngestConfig) -> tuple[Image.Image, int, int]:
    """Decode ``data`` to an upright RGB image; returns (image, original width, height).

    Size filters run on the header, before the pixels are decoded.
    """
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
    except Image.DecompressionBombError as e:
        raise Rejected("too_many_pixels", str(e)) from None
    except Exception as e:  # PIL raises many types for hostile input
        raise Rejected("decode_error", f"{type(e).__name__}: {e}") from None
    if width * height > cfg.max_pixels:
        raise Rejected("too_many_pixels", f"{width}x{height} > {cfg.max_pixels} pixels")
    if min(width, height) < max(cfg.min_image_size, 1):
        raise Rejected("too_small", f"{width}x{height}")
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        raise Rejected("bad_aspect_ratio", f"{width}x{height}")
    try:
        if cfg.resize_mode != "no" and img.format == "JPEG":
            img.draft("RGB", (cfg.image_size, cfg.image_size))  # decode at reduced scale
        img.load()
        img = _to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as e:
        raise Rejected("too_many_pixels", str(e)) from None
    except Exception as e:
        raise Rejected("decode_error", f"{type(e).__name__}: {e}") from None
    return img, width, height


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_image(img: Image.Image, size: int, mode: str) -> Image.Image:
    """``center_crop``: shorter side to ``size`` then crop the centre square;
    ``keep_ratio``: shorter side to ``size``; ``border``: longer side to ``size`` then pad
    to a black square; ``no``: unchanged."""
    if mode == "no":
        return img
    w, h = img.size
    scale = size / (max(w, h) if mode == "border" else min(w, h))
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        downscale = scale < 1
        img = img.resize(
            (nw, nh),
            Image.Resampling.LANCZOS if downscale else Image.Resampling.BICUBIC,
            reducing_gap=3.0 if downscale else None,
        )
    if mode == "center_crop":
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif mode == "border":
        canvas = Image.new("RGB", (size, size))
        canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
        img = canvas
    return img


def encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format=_PIL_FORMATS[fmt], quality=quality)
    return buf.getvalue()


def caption_reason(caption: Any, min_words: int) -> str | None:
    if caption is None or not str(caption).strip():
        return "no_caption"
    if len(str(caption).split()) < min_words:
        return "caption_too_short"
    return None


# ---------------------------------------------------------------- one row


@dataclass
class _Outcome:
    key: str
    url: Any
    caption: Any
    reason: str | None = None
    error: str | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    image: bytes | None = None
    downloaded: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is None


def _process_row(row: dict, key: str, cfg: IngestConfig, limiter) -> _Outcome:
    url, caption = row.get(cfg.url_col), row.get(cfg.caption_col)
    if isinstance(caption, str):
        caption = caption.strip()
    out = _Outcome(key=key, url=url, caption=caption)
    reason = caption_reason(caption, cfg.min_caption_words)
    if reason is None and not (isinstance(url, str) and url.strip()):
        reason = "bad_url"
    if reason is not None:  # checked first: no point downloading what we will drop
        out.reason = reason
        return out
    result = fetch(url.strip(), cfg.fetch, rate_limiter=limiter)
    if not result.ok:
        out.reason, out.error = result.reason, result.error
        return out
    out.downloaded = len(result.data)
    out.sha256 = hashlib.sha256(result.data).hexdigest()
    try:
        img, out.width, out.height = decode_image(result.data, cfg)
        img = resize_image(img, cfg.image_size, cfg.resize_mode)
        out.image = encode_image(img, cfg.encode_format, cfg.encode_quality)
    except Rejected as r:
        out.reason, out.error = r.reason, str(r)
    except Exception as e:  # a bug or an exotic image must cost one sample, not the shard
        out.reason, out.error = "processing_error", f"{type(e).__name__}: {e}"
    return out


# ---------------------------------------------------------------- one shard


def _atomic_write(fs, path: str, write: Callable[[Any], None]) -> None:
    directory, name = path.rsplit("/", 1)
    tmp = f"{directory}/.{name}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, path)
        else:  # object stores have no rename; the stats file, written last, is the commit
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def _extras(row: dict, cfg: IngestConfig) -> dict:
    extras = {}
    for name, value in row.items():
        if name in (cfg.url_col, cfg.caption_col):
            continue
        extras[f"input_{name}" if name in _RESERVED_COLUMNS else name] = value
    return extras


def _write_tar(f, outcomes: list[_Outcome], rows: list[dict], cfg: IngestConfig) -> None:
    import webdataset as wds

    # mtime fixed so the same input gives the same bytes
    with wds.TarWriter(f, mtime=0) as sink:
        for out, row in zip(outcomes, rows):
            if not out.ok:
                continue
            meta = {
                "key": out.key, "url": out.url, "caption": out.caption, "status": "success",
                "width": out.width, "height": out.height, "sha256": out.sha256,
                **_extras(row, cfg),
            }
            sink.write({
                "__key__": out.key,
                cfg.encode_format: out.image,
                "txt": str(out.caption).encode("utf-8"),
                "json": json.dumps(meta, default=str, ensure_ascii=False).encode("utf-8"),
            })


def _status_table(outcomes: list[_Outcome], rows: list[dict], cfg: IngestConfig) -> pa.Table:
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
            **_extras(row, cfg),
        })
    return pa.Table.from_pylist(records)


def shard_paths(output_dir: str, shard_id: int) -> dict[str, str]:
    base = f"{output_dir.rstrip('/')}/{shard_id:05d}"
    return {"tar": f"{base}.tar", "parquet": f"{base}.parquet", "stats": f"{base}_stats.json"}


def ingest_shard(rows: list[dict], shard_id: int, output_dir: str, cfg: IngestConfig) -> dict:
    """Download, filter and write one shard; returns its stats (``skipped`` if committed)."""
    start = time.monotonic()
    fs, root = fsspec.core.url_to_fs(output_dir)
    paths = shard_paths(root, shard_id)
    if fs.exists(paths["stats"]):
        with fs.open(paths["stats"], "r") as f:
            return {**json.load(f), "skipped": True}
    fs.makedirs(root, exist_ok=True)

    width = max(4, len(str(cfg.shard_size - 1)))
    keys = [f"{shard_id:05d}{i:0{width}d}" for i in range(len(rows))]
    rate = cfg.fetch.rate_limit_per_domain
    limiter = DomainRateLimiter(rate) if rate > 0 else None
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.threads, len(rows)))) as pool:
        outcomes = list(pool.map(lambda k, r: _process_row(r, k, cfg, limiter), keys, rows))

    _atomic_write(fs, paths["tar"], lambda f: _write_tar(f, outcomes, rows, cfg))
    table = _status_table(outcomes, rows, cfg)
    _atomic_write(fs, paths["parquet"], lambda f: pq.write_table(table, f))
    failures = Counter(o.reason for o in outcomes if not o.ok)
    stats = {
        "shard_id": shard_id,
        "total": len(outcomes),
        "success": len(outcomes) - sum(failures.values()),
        "failed": sum(failures.values()),
        "failures_by_reason": dict(sorted(failures.items())),
        "bytes_downloaded": sum(o.downloaded for o in outcomes),
        "bytes_written": fs.size(paths["tar"]),
        "elapsed_s": round(time.monotonic() - start, 3),
    }
    _atomic_write(fs, paths["stats"], lambda f: f.write(json.dumps(stats, indent=1).encode()))
    return {**stats, "skipped": False}


# ---------------------------------------------------------------- the whole table, on Ray


@dataclass
class IngestSummary:
    """What one ``ingest`` run did; sample counts cover the shards written by this run."""

    shards_total: int = 0
    shards_skipped: int = 0
    shards_written: int = 0
    samples_success: int = 0
    samples_failed: int = 0
    failures_by_reason: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0

    def add(self, stats: dict) -> None:
        self.shards_written += 1
        self.samples_success += stats["success"]
        self.samples_failed += stats["failed"]
        self.failures_by_reason.update(stats["failures_by_reason"])

    def format(self) -> str:
        total = self.samples_success + self.samples_failed
        pct = 100.0 * self.samples_failed / total if total else 0.0
        rate = total / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"shards    {self.shards_total} total, {self.shards_skipped} skipped, "
            f"{self.shards_written} written",
            f"samples   {self.samples_success} ok, {self.samples_failed} failed ({pct:.1f}%)",
        ]
        for reason, n in self.failures_by_reason.most_common():
            lines.append(f"  {reason:<20} {n}")
        lines.append(f"elapsed   {self.elapsed_s:.1f} s ({rate:.1f} samples/s)")
        return "\n".join(lines)


@contextlib.contextmanager
def _ray_session():
    """Use the caller's Ray if initialised, else a private local instance on loopback."""
    from data_pipeline.local_ray import loopback_env, use_loopback_only

    use_loopback_only()
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        runtime_env={"env_vars": loopback_env()},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def _run_shards(ray, table: pa.Table, shard_ids: list[int], output_dir: str,
                cfg: IngestConfig, summary: IngestSummary, progress: bool, metrics=None) -> None:
    from tqdm import tqdm

    task = ray.remote(num_cpus=1, max_retries=cfg.task_retries, retry_exceptions=True)(ingest_shard)
    # A bounded window keeps the rows of at most a few shards in the object store at once.
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    queue, in_flight = deque(shard_ids), {}
    n_rows = sum(min(cfg.shard_size, table.num_rows - s * cfg.shard_size) for s in shard_ids)
    start = time.monotonic()
    with tqdm(total=n_rows, unit="sample", disable=not progress, desc="ingest") as bar:
        while queue or in_flight:
            while queue and len(in_flight) < window:
                sid = queue.popleft()
                rows = table.slice(sid * cfg.shard_size, cfg.shard_size).to_pylist()
                in_flight[task.remote(rows, sid, output_dir, cfg)] = sid
            if metrics:
                metrics.set_queue(queued=len(queue), in_flight=len(in_flight))
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in done:
                sid = in_flight.pop(ref)
                try:
                    stats = ray.get(ref)
                except Exception as e:
                    for other in in_flight:
                        ray.cancel(other)
                    raise RuntimeError(
                        f"ingest: shard {sid:05d} failed after {cfg.task_retries} retries: {e}"
                    ) from e
                summary.add(stats)
                if metrics:
                    metrics.record_shard(stats)
                    metrics.set_queue(queued=len(queue), in_flight=len(in_flight))
                bar.update(stats["total"])
                done_samples = summary.samples_success + summary.samples_failed
                rate = done_samples / (time.monotonic() - start)
                bar.set_postfix(failed=summary.samples_failed, samples_per_s=f"{rate:.1f}")


def ingest(
    input_path: str, output_dir: str, cfg: IngestConfig, *, progress: bool = True, metrics=None
) -> IngestSummary:
    """Ingest the whole table; raises ``RuntimeError`` naming the shard if one keeps failing.

    ``metrics``: an optional ``data_pipeline.metrics.IngestMetrics`` fed as shards finish."""
    start = time.monotonic()
    table = read_table(input_path, url_col=cfg.url_col, caption_col=cfg.caption_col)
    fs, root = fsspec.core.url_to_fs(output_dir)
    fs.makedirs(root, exist_ok=True)
    n_shards = math.ceil(table.num_rows / cfg.shard_size)
    pending = [s for s in range(n_shards) if not fs.exists(shard_paths(root, s)["stats"])]
    summary = IngestSummary(shards_total=n_shards, shards_skipped=n_shards - len(pending))
    if metrics:
        for _ in range(summary.shards_skipped):
            metrics.record_shard({"skipped": True})
        metrics.set_queue(queued=len(pending), in_flight=0)
    if pending:
        with _ray_session() as ray:
            _run_shards(ray, table, pending, output_dir, cfg, summary, progress, metrics)
    summary.elapsed_s = time.monotonic() - start
    return summary
