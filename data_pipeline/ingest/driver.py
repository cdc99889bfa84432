"""Turn a URL+caption table into webdataset shards: one Ray task per shard of N rows.

Per shard ``{id:05d}`` in ``output_dir``: ``.tar`` (image, ``txt`` caption, ``json``
metadata per sample), ``.parquet`` (one row per input row, success or failure with its
reason) and ``_stats.json``. Each file is written under a temporary name (``.NAME.tmp-*``,
never ``*.tar``) and renamed; ``_stats.json`` goes last, so its presence means the shard
is committed and a rerun skips it. ``retry_failed`` redoes only the failed rows of
committed shards. Exact duplicates (by content hash) are dropped across the whole run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.parquet as pq
import pyspng
from PIL import Image, ImageOps

from data_pipeline.config import IngestConfig, InputError
from data_pipeline.ingest.dedup import DedupRegistry, ProgressReporter, claim
from data_pipeline.ingest.fetch import DomainRateLimiter, fetch
from data_pipeline.ingest.table import check_columns, count_rows, iter_shards, table_schema
from data_pipeline.shards.write import write_samples

_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_EXIF_ORIENTATION = 0x0112
_DOWNSCALE = {"box": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC,
              "lanczos": Image.Resampling.LANCZOS}
_RESERVED_COLUMNS = (
    "key", "url", "caption", "status", "reason", "error", "width", "height", "sha256", "language",
)


class Rejected(Exception):
    """A sample that cannot be kept; ``reason`` is a bounded snake_case label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


# ---------------------------------------------------------------- one image


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Pillow's lazy open of ``data``: the header only, refused (``too_many_pixels``) when it
    declares more than ``max_pixels`` pixels, before any pixel is decoded. The decompression
    bomb guard of every decoder of untrusted images (ingest, training, eval, inspect)."""
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: under -W error
        raise Rejected("too_many_pixels", str(e)) from None
    except Exception as e:  # PIL raises many types for hostile input
        raise Rejected("decode_error", f"{type(e).__name__}: {e}") from None
    if width * height > max_pixels:
        raise Rejected("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")
    return img


def decode_image(data: bytes, cfg: IngestConfig) -> tuple[Image.Image, int, int]:
    """Decode ``data`` to an upright RGB image; returns (image, original width, height).

    The pixels are Pillow's (first frame, EXIF orientation applied, alpha and tRNS
    transparency composited on white; tests/unit/test_image_fidelity.py checks every format).
    Size filters run on the header, before the pixels are decoded.
    """
    img = open_image(data, cfg.max_pixels)
    width, height = img.size
    if min(width, height) < max(cfg.min_image_size, 1):
        raise Rejected("too_small", f"{width}x{height}")
    if cfg.max_image_size and max(width, height) > cfg.max_image_size:
        raise Rejected("too_big", f"{width}x{height} > {cfg.max_image_size}")
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        raise Rejected("bad_aspect_ratio", f"{width}x{height}")
    try:
        if img.format == "PNG":
            img = _decode_png(data, img)
        else:
            if cfg.resize_mode != "no" and img.format == "JPEG":
                img.draft("RGB", (cfg.image_size, cfg.image_size))  # decode at reduced scale
            img.load()
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise Rejected("too_many_pixels", str(e)) from None
    except Exception as e:
        raise Rejected("decode_error", f"{type(e).__name__}: {e}") from None
    return img, width, height


# Pillow's mode of a PNG -> the libspng output that gives the same pixels. libspng is not
# told to apply tRNS (pyspng passes no decode flags), so a PNG with tRNS never takes it.
_SPNG_FORMAT = {"RGB": "RGB", "RGBA": "RGBA", "L": "RGB", "LA": "RGBA", "P": "RGB", "1": "RGB",
                "I;16": "RGB", "I;16B": "RGB", "I": "RGB"}


def _decode_png(data: bytes, header: Image.Image) -> Image.Image:
    """Decode a PNG with libspng (pyspng) rather than Pillow where the two give the same
    pixels: 1.6 ms against Pillow's 3.7 ms for the benchmark corpus's PNGs (256-1024 px),
    the largest cost of ingesting them. Pillow has read the header (size checks, mode,
    tRNS, eXIf before the pixels). libspng ignores tRNS, so a PNG with one is decoded by
    Pillow (its 16-bit kinds by ``_png_trns16``, as Pillow compares 16-bit tRNS values
    with 8-bit pixels); so is one with an eXIf after the pixels, and the rare PNG that
    libspng refuses, so a file Pillow accepts is not lost."""
    fmt = _SPNG_FORMAT.get(header.mode)
    if "transparency" in header.info:
        return _png_trns16(data, header) if data[24:25] == b"\x10" else _pillow_load(header)
    if fmt is None or ("exif" not in header.info and _png_late_exif(data, header)):
        return _pillow_load(header)
    try:
        pixels = pyspng.load(data, format=fmt)
    except RuntimeError:
        return _pillow_load(header)
    img = Image.fromarray(pixels, fmt)
    if "exif" in header.info:  # an eXIf chunk before the pixels: keep the orientation
        img.info["exif"] = header.info["exif"]
    return img


def _pillow_load(img: Image.Image) -> Image.Image:
    img.load()
    return img


def _png_late_exif(data: bytes, header: Image.Image) -> bool:
    """Whether an eXIf chunk follows the image data (Pillow reads it on load; the header
    has not seen it). Walks the chunk headers from the first IDAT: a few hops."""
    pos = header.tile[0][2] - 8 if header.tile else 8
    while pos + 8 <= len(data):
        kind = data[pos + 4:pos + 8]
        if kind == b"eXIf":
            return True
        if kind == b"IEND":
            return False
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return False


def _png_trns16(data: bytes, header: Image.Image) -> Image.Image:
    """A 16-bit grey or RGB PNG with tRNS: the pixels equal to the 16-bit tRNS value are
    transparent; the rest keep their high byte, as Pillow and libspng reduce 16 bits."""
    import numpy as np

    try:
        pixels = pyspng.load(data)  # 16-bit grey -> GA16, RGB -> RGBA16, alpha all opaque
    except RuntimeError:
        return _pillow_load(header)
    colour = pixels[..., :-1]
    trns = np.asarray(header.info["transparency"], dtype=np.uint16).reshape(-1)
    alpha = np.where((colour == trns).all(axis=-1), 0, 255).astype(np.uint8)
    rgb = np.broadcast_to((colour >> 8).astype(np.uint8), colour.shape[:2] + (3,))
    img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if "exif" in header.info:
        img.info["exif"] = header.info["exif"]
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency (an alpha band, a palette's alpha, a tRNS colour or
    index) composited on white; 16-bit grey reduced to its high byte (Pillow's own
    conversion clips it at 255, turning it white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = _grey16_to_8(img)
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if (img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
            or (img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA")):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _grey16_to_8(img: Image.Image) -> Image.Image:
    """16-bit grey -> 8-bit 'L' (high byte), or 'LA' where a tRNS value makes pixels
    transparent."""
    import numpy as np

    samples = np.asarray(img).astype(np.int64)
    grey = Image.fromarray(np.clip(samples >> 8, 0, 255).astype(np.uint8), "L")
    trns = img.info.get("transparency")
    if not isinstance(trns, int):
        return grey
    alpha = Image.fromarray(np.where(samples == trns, 0, 255).astype(np.uint8), "L")
    return Image.merge("LA", (grey, alpha))


def resize_image(img: Image.Image, size: int, mode: str, downscale: str = "box") -> Image.Image:
    """``center_crop``: shorter side to ``size`` then crop the centre square;
    ``keep_ratio``: shorter side to ``size``; ``border``: longer side to ``size`` then pad
    to a black square; ``no``: unchanged.

    Shrinking uses ``downscale`` ("box": area averaging, like OpenCV's INTER_AREA that
    img2dataset uses; "bicubic"; "lanczos"), enlarging bicubic. center_crop resamples
    only the centre square of the source, not the whole image."""
    if mode == "no":
        return img
    w, h = img.size
    scale = size / (max(w, h) if mode == "border" else min(w, h))
    resample = _DOWNSCALE[downscale] if scale < 1 else Image.Resampling.BICUBIC
    if mode == "center_crop":
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return img.resize((size, size), resample, box=box)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    if mode == "border":
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


# ---------------------------------------------------------------- one row


def caption_reason(caption: Any, cfg: IngestConfig) -> tuple[str | None, str | None, str | None]:
    """(reason, detail, detected language) for a caption; reason None = keep.

    Cheap rules run before the download, so a row they drop costs no request."""
    if caption is None or not str(caption).strip():
        return "no_caption", None, None
    text = str(caption)
    words = len(text.split())
    if words < cfg.min_caption_words:
        return "caption_too_short", f"{words} words < {cfg.min_caption_words}", None
    if cfg.max_caption_words and words > cfg.max_caption_words:
        return "caption_too_long", f"{words} words > {cfg.max_caption_words}", None
    if len(text) < cfg.min_caption_length:
        return "caption_too_short", f"{len(text)} characters < {cfg.min_caption_length}", None
    if cfg.max_caption_length and len(text) > cfg.max_caption_length:
        return "caption_too_long", f"{len(text)} characters > {cfg.max_caption_length}", None
    if not cfg.languages:
        return None, None, None
    from data_pipeline.ingest.lang import detect

    language, score = detect(text)
    if language not in cfg.languages or score < cfg.min_language_score:
        return "wrong_language", f"{language} ({score:.2f})", language
    return None, None, language


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
    language: str | None = None
    image: bytes | None = None
    image_ext: str = "jpg"
    downloaded: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is None

    def reject(self, reason: str, error: str | None) -> None:
        self.reason, self.error, self.image = reason, error, None


def _process_row(row: dict, key: str, cfg: IngestConfig, limiter, cpu_slots=None) -> _Outcome:
    url, caption = row.get(cfg.url_col), row.get(cfg.caption_col)
    if isinstance(caption, str):
        caption = caption.strip()
    out = _Outcome(key=key, url=url, caption=caption, image_ext=cfg.encode_format)
    reason, detail, out.language = caption_reason(caption, cfg)
    if reason is None and not (isinstance(url, str) and url.strip()):
        reason, detail = "bad_url", "empty URL"
    if reason is not None:  # checked first: no point downloading what we will drop
        out.reject(reason, detail)
        return out
    result = fetch(url.strip(), cfg.fetch, rate_limiter=limiter)
    if not result.ok:
        out.reject(result.reason, result.error)
        return out
    out.downloaded = len(result.data)
    with cpu_slots or contextlib.nullcontext():
        out.sha256 = hashlib.sha256(result.data).hexdigest()
        try:
            img, out.width, out.height = decode_image(result.data, cfg)
            img = resize_image(img, cfg.image_size, cfg.resize_mode, cfg.downscale)
            out.image = encode_image(img, cfg.encode_format, cfg.encode_quality)
        except Rejected as r:
            out.reject(r.reason, str(r))
        except Exception as e:  # a bug or an exotic image must cost one sample, not the shard
            out.reject("processing_error", f"{type(e).__name__}: {e}")
    return out


def _mark_duplicates(outcomes: list[_Outcome], registry, shard_id: int) -> None:
    """Exact duplicates by content hash: the first row of the shard with a hash, then the
    first shard of the run to claim it (see ``data_pipeline.ingest.dedup``), keeps the image."""
    first: dict[bytes, str] = {}
    entries = []
    for out in outcomes:
        if not out.ok or out.sha256 is None:
            continue
        digest = bytes.fromhex(out.sha256)
        if digest in first:
            out.reject("duplicate", f"same image as {first[digest]}")
            continue
        first[digest] = out.key
        entries.append((digest, out.key))
    by_key = {out.key: out for out in outcomes}
    for (_, key), owner in zip(entries, claim(registry, shard_id, entries)):
        if owner != key:
            by_key[key].reject("duplicate", f"same image as {owner}")


# ---------------------------------------------------------------- one shard


TRANSIENT_REASONS = frozenset(
    {"connection_error", "timeout", "deadline", "dns_error", "http_408", "http_429", "processing_error"}
)


def is_transient(reason: str | None) -> bool:
    """Failures worth fetching again later (what ``--retry-failed`` retries by default)."""
    return reason is not None and (reason in TRANSIENT_REASONS or
                                   (reason.startswith("http_5") and reason[5:].isdigit()))


def _atomic_write(fs, path: str, write: Callable[[Any], None]) -> None:
    directory, name = path.rsplit("/", 1)
    tmp = f"{directory}/.{name}.tmp-{uuid.uuid4().hex}"  # never matches *.tar / *.parquet
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
            "language": out.language,
            **_extras(row, cfg),
        })
    return pa.Table.from_pylist(records)


def shard_paths(output_dir: str, shard_id: int) -> dict[str, str]:
    base = f"{output_dir.rstrip('/')}/{shard_id:05d}"
    return {"tar": f"{base}.tar", "parquet": f"{base}.parquet", "stats": f"{base}_stats.json"}


def _read_stats(fs, paths: dict) -> dict:
    with fs.open(paths["stats"], "r") as f:
        return json.load(f)


def _previous_outcomes(fs, paths: dict, keys: list[str]) -> list[_Outcome | None]:
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
            if member.isfile() and ext in _PIL_FORMATS:
                images[key] = (ext, tar.extractfile(member).read())
    previous: list[_Outcome | None] = []
    for key in keys:
        row = status.get(key)
        if row is None or (row["status"] == "success" and key not in images):
            previous.append(None)
            continue
        out = _Outcome(key=key, url=row["url"], caption=row["caption"], reason=row["reason"],
                       error=row["error"], width=row["width"], height=row["height"],
                       sha256=row["sha256"], language=row.get("language"))
        if row["status"] == "success":
            out.image_ext, out.image = images[key]
        else:
            out.reason = out.reason or "unknown"
        previous.append(out)
    return previous


def _wants_retry(out: _Outcome | None, retry_reasons: frozenset[str] | None) -> bool:
    if out is None:
        return True
    if out.ok:
        return False
    return is_transient(out.reason) if not retry_reasons else (
        "all" in retry_reasons or out.reason in retry_reasons)


def ingest_shard(rows: list[dict] | pa.Table, shard_id: int, output_dir: str, cfg: IngestConfig, *,
                 registry=None, retry_reasons: frozenset[str] | None = None,
                 retry_failed: bool = False) -> dict:
    """Download, filter and write one shard; returns its stats (``skipped`` if committed).

    With ``retry_failed`` a committed shard is redone in place: only its failed rows whose
    reason is in ``retry_reasons`` (default: the transient ones, see ``is_transient``; "all"
    for every reason) are fetched again, the rest is carried over from the shard's files."""
    start = time.monotonic()
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

    outcomes: list[_Outcome | None] = list(previous) if previous is not None else [None] * len(rows)
    rate = cfg.fetch.rate_limit_per_domain
    limiter = DomainRateLimiter(rate) if rate > 0 else None
    reporter = ProgressReporter(registry, shard_id)

    # Downloads overlap; decoding takes turns (decode_threads at once): with all 16
    # threads decoding on the task's one core, two tasks on two cores took ~12% longer
    # on the benchmark corpus than with one decoder each (cache and GIL contention).
    cpu_slots = threading.BoundedSemaphore(cfg.decode_threads)

    def work(i: int) -> None:
        outcomes[i] = _process_row(rows[i], keys[i], cfg, limiter, cpu_slots)
        reporter.add(outcomes[i].ok)

    with ThreadPoolExecutor(max_workers=max(1, min(cfg.threads, len(todo) or 1))) as pool:
        list(pool.map(work, todo))
    if cfg.dedup:
        _mark_duplicates(outcomes, registry, shard_id)

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
        "fetched": len(todo),
        "retry": previous is not None,
        "bytes_downloaded": sum(outcomes[i].downloaded for i in todo),
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
    samples_fetched: int = 0
    failures_by_reason: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0
    driver_peak_rss_bytes: int = 0

    def add(self, stats: dict) -> None:
        if stats.get("skipped"):
            self.shards_skipped += 1
            return
        self.shards_written += 1
        self.samples_success += stats["success"]
        self.samples_failed += stats["failed"]
        self.samples_fetched += stats.get("fetched", stats["total"])
        self.failures_by_reason.update(stats["failures_by_reason"])

    def format(self) -> str:
        total = self.samples_success + self.samples_failed
        pct = 100.0 * self.samples_failed / total if total else 0.0
        rate = self.samples_fetched / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"shards    {self.shards_total} total, {self.shards_skipped} skipped, "
            f"{self.shards_written} written",
            f"samples   {self.samples_success} ok, {self.samples_failed} failed ({pct:.1f}%), "
            f"{self.samples_fetched} processed now",
        ]
        for reason, n in self.failures_by_reason.most_common():
            lines.append(f"  {reason:<20} {n}")
        lines.append(f"elapsed   {self.elapsed_s:.1f} s ({rate:.1f} samples/s)")
        lines.append(f"driver    peak RSS {self.driver_peak_rss_bytes / 2**20:.0f} MiB")
        return "\n".join(lines)


@contextlib.contextmanager
def _ray_session():
    """Use the caller's Ray if initialised, else a private local instance on loopback."""
    from cluster.ray.loopback import use_loopback_only

    use_loopback_only()
    import ray

    if ray.is_initialized():
        yield ray
        return
    # No runtime_env: the workers inherit the loopback settings from this process's
    # environment (the raylet is our child), and a runtime_env would keep Ray from using
    # the workers it starts with the node (the first tasks waited ~1 s for new ones).
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def committed_shards(fs, root: str) -> set[int]:
    """Ids of the committed shards in ``root`` (one listing, not one request per shard)."""
    if not fs.exists(root):
        return set()
    ids = set()
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith("_stats.json") and name[:-11].isdigit():
            ids.add(int(name[:-11]))
    return ids


def remove_stale_temporaries(fs, root: str) -> int:
    """Temporary files left by a killed run (``.NAME.tmp-*``); one driver per output dir."""
    if not fs.exists(root):  # an object store has no empty directories
        return 0
    stale = [p for p in fs.ls(root, detail=False) if ".tmp-" in p.rsplit("/", 1)[-1]]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
    return len(stale)


def _load_committed_owners(registry_cls):
    """A registry actor method: owners of the committed shards' images, read where they live."""

    def load(self, output_dir: str, shard_ids: list[int]) -> int:
        fs, root = fsspec.core.url_to_fs(output_dir)
        for sid in sorted(shard_ids):
            with fs.open(shard_paths(root, sid)["parquet"], "rb") as f:
                table = pq.read_table(f, columns=["key", "status", "sha256"])
            entries = [(bytes.fromhex(r["sha256"]), r["key"]) for r in table.to_pylist()
                       if r["status"] == "success" and r["sha256"]]
            self.preload(entries)
        return self.size()

    return type("RunRegistry", (registry_cls,), {"load_committed": load})


@dataclass
class _Run:
    """The driver's view of one ingest run."""

    ray: Any
    output_dir: str
    cfg: IngestConfig
    summary: IngestSummary
    registry: Any
    retry_failed: bool
    retry_reasons: frozenset[str] | None
    metrics: Any = None
    in_flight: dict = field(default_factory=dict)
    rows_done: int = 0
    failed_done: int = 0

    def finish(self, ref) -> None:
        sid, n_rows = self.in_flight.pop(ref)
        try:
            stats = self.ray.get(ref)
        except Exception as e:
            for other in self.in_flight:
                self.ray.cancel(other)
            raise self.failure(sid, e) from e
        self.registry.finish.remote(sid)
        self.summary.add(stats)
        self.rows_done += n_rows
        self.failed_done += 0 if stats.get("skipped") else stats["failed"]
        if self.metrics:
            self.metrics.record_shard(stats)

    def failure(self, sid: int, error: Exception) -> "ShardFailed":
        """The error naming the shard, where it goes and whether it was retried: a task's
        own exception (Ray's RayTaskError carries it as ``cause``) is retried only when
        transient; a lost worker always is."""
        cause = getattr(error, "cause", None) or error
        retried = cause is error or isinstance(cause, transient_exceptions())
        how = f"after {self.cfg.task_retries} retries" if retried else "(not retried: it would fail again)"
        where = shard_paths(self.output_dir, sid)["tar"]
        return ShardFailed(f"ingest: shard {sid:05d} ({where}) failed {how}: {type(cause).__name__}: {cause}")


class ShardFailed(RuntimeError):
    """A shard could not be written; the message names the shard, its path and the cause."""


def transient_exceptions() -> tuple[type[BaseException], ...]:
    """The exceptions of a shard task worth another attempt (network and storage hiccups).
    Anything else (PermissionError, a full disk, a bad schema, a ValueError of bad input)
    would fail again the same way, after fetching every row of the shard again."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as boto

        types += [boto.ConnectionError, boto.HTTPClientError]
    with contextlib.suppress(ImportError):
        import aiohttp

        types.append(aiohttp.ClientError)
    return tuple(types)


def _run_shards(run: _Run, input_path: str, committed: set[int], total_rows: int | None,
                progress: bool) -> None:
    from tqdm import tqdm

    cfg, ray, summary = run.cfg, run.ray, run.summary
    task = ray.remote(num_cpus=1, max_retries=cfg.task_retries,
                      retry_exceptions=list(transient_exceptions()))(ingest_shard)
    # A bounded window keeps the rows of at most a few shards in memory at once.
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    start = time.monotonic()
    # Our own rate: tqdm's would count the rows of skipped shards as processed at once.
    bar_format = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
                  if total_rows else "{desc}: {n_fmt} rows [{elapsed}{postfix}]")
    bar = tqdm(total=total_rows, disable=not progress, desc="ingest", bar_format=bar_format)

    def refresh(wait_s: float) -> None:
        done, _ = ray.wait(list(run.in_flight), num_returns=1, timeout=wait_s) if run.in_flight else ([], [])
        for ref in done:
            run.finish(ref)
        running, running_failed = ray.get(run.registry.running_totals.remote())
        bar.n = run.rows_done + running
        rate = (bar.n - skipped_rows) / max(time.monotonic() - start, 1e-9)
        bar.set_postfix_str(f"{rate:.1f} samples/s, {run.failed_done + running_failed} failed", refresh=False)
        bar.refresh()
        if run.metrics:  # shards not yet submitted (known when the table's length is)
            queued = -(-total_rows // cfg.shard_size) - summary.shards_total if total_rows else 0
            run.metrics.set_queue(queued=max(queued, 0), in_flight=len(run.in_flight))

    skipped_rows = 0
    with bar:
        for sid, rows in enumerate(iter_shards(input_path, cfg.shard_size, url_col=cfg.url_col,
                                               caption_col=cfg.caption_col)):
            summary.shards_total += 1
            if sid in committed and not run.retry_failed:
                summary.shards_skipped += 1
                skipped_rows += rows.num_rows
                run.rows_done += rows.num_rows
                if run.metrics:
                    run.metrics.record_shard({"skipped": True})
                continue
            while len(run.in_flight) >= window:
                refresh(0.5)
            ref = task.remote(rows, sid, run.output_dir, cfg, registry=run.registry,
                              retry_reasons=run.retry_reasons, retry_failed=run.retry_failed)
            run.in_flight[ref] = (sid, rows.num_rows)
            del rows
        while run.in_flight:
            refresh(0.5)
        refresh(0)


def check_writable(output_dir: str) -> None:
    """Creates ``output_dir`` and writes and removes a small probe file there (one PUT and
    one DELETE on an object store); raises ``InputError`` naming the directory if it cannot.
    A probe left by a crash has a temporary's name, which the next run removes."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    probe = f"{root.rstrip('/')}/.write-probe.tmp-{uuid.uuid4().hex}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"probe")
        fs.rm(probe)
    except OSError as e:
        raise InputError(f"--output {output_dir}: cannot write there ({type(e).__name__}: {e})") from None


def preflight(input_path: str, output_dir: str, cfg: IngestConfig) -> bool:
    """The checks that need no Ray, run before it starts (which takes seconds): the table's
    columns (read from its head only) and a probe write to ``output_dir``. Raises
    ``InputError``; an empty table is only warned about (on stderr). -> whether it has rows."""
    names, has_rows = table_schema(input_path)
    if names:
        check_columns(input_path, names, url_col=cfg.url_col, caption_col=cfg.caption_col)
    if not has_rows:
        print(f"warning: {input_path} has no rows: nothing to ingest", file=sys.stderr, flush=True)
        return False
    check_writable(output_dir)
    return True


def ingest(
    input_path: str, output_dir: str, cfg: IngestConfig, *, progress: bool = True, metrics=None,
    retry_failed: bool = False, retry_reasons: frozenset[str] | None = None, checked: bool = False,
) -> IngestSummary:
    """Ingest the whole table; raises ``ShardFailed`` naming the shard if one fails for good.

    ``preflight`` runs first, before Ray starts (``checked``: the caller ran it); an empty
    table returns an empty summary. The table is streamed (the driver's memory does not grow
    with it). Committed shards are skipped, or with ``retry_failed`` redone for their failed
    rows (see ``ingest_shard``). ``metrics``: an optional
    ``data_pipeline.metrics.IngestMetrics`` fed as shards finish."""
    start = time.monotonic()
    if not checked and not preflight(input_path, output_dir, cfg):
        return IngestSummary()
    fs, root = fsspec.core.url_to_fs(output_dir)
    fs.makedirs(root, exist_ok=True)
    remove_stale_temporaries(fs, root)
    committed = committed_shards(fs, root)
    total_rows = count_rows(input_path)
    summary = IngestSummary()
    with _ray_session() as ray:
        registry = ray.remote(_load_committed_owners(DedupRegistry)).options(num_cpus=0).remote()
        if cfg.dedup and committed:
            ray.get(registry.load_committed.remote(output_dir, sorted(committed)))
        concurrent = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if cfg.fetch.rate_limit_per_domain > 0:  # the run's budget, shared by the running tasks
            fetch_cfg = cfg.fetch.model_copy(update={
                "rate_limit_per_domain": cfg.fetch.rate_limit_per_domain / concurrent})
            cfg = cfg.model_copy(update={"fetch": fetch_cfg})
        run = _Run(ray, output_dir, cfg, summary, registry, retry_failed, retry_reasons, metrics)
        try:
            _run_shards(run, input_path, committed, total_rows, progress)
        finally:
            ray.kill(registry)
    missing = sorted(set(range(summary.shards_total)) - committed_shards(fs, root))
    if missing:  # never silently lose a shard
        raise ShardFailed(f"ingest: shard(s) {', '.join(f'{s:05d}' for s in missing[:10])} not committed "
                          f"in {output_dir}")
    summary.elapsed_s = time.monotonic() - start
    summary.driver_peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return summary
