"""One input row of ingest: its caption rules, download and image processing, as an ``Outcome``."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any

from data_pipeline.config import IngestConfig
from data_pipeline.ingest.captions import caption_reason
from data_pipeline.ingest.codec import Rejected, decode_image, encode_image, resize_image
from data_pipeline.ingest.fetch import fetch


@dataclass
class Outcome:
    """What became of one row: a kept image (``reason`` None) or the reason it was dropped.
    ``width``/``height`` are the stored (resized) image's, None when nothing is stored;
    ``original_width``/``original_height`` the downloaded image's (img2dataset's meanings)."""

    key: str
    url: Any
    caption: Any
    reason: str | None = None
    error: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
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
        self.width = self.height = None  # nothing stored


def process_row(row: dict, key: str, cfg: IngestConfig, limiter, cpu_slots=None) -> Outcome:
    """Caption rules first (a dropped row costs no request), then fetch, decode, resize and
    encode; never raises for a bad row. ``cpu_slots`` bounds the threads decoding at once."""
    url, caption = row.get(cfg.url_col), row.get(cfg.caption_col)
    if isinstance(caption, str):
        caption = caption.strip()
    out = Outcome(key=key, url=url, caption=caption, image_ext=cfg.encode_format)
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
            img, out.original_width, out.original_height = decode_image(result.data, cfg)
            img = resize_image(img, cfg.image_size, cfg.resize_mode, cfg.downscale)
            out.image = encode_image(img, cfg.encode_format, cfg.encode_quality)
            out.width, out.height = img.size
        except Rejected as r:
            out.reject(r.reason, str(r))
        except Exception as e:  # a bug or an exotic image must cost one sample, not the shard
            out.reject("processing_error", f"{type(e).__name__}: {e}")
    return out
