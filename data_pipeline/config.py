"""Typed config slices for the data pipeline (fetching, ingestion, scoring and filtering).

Each model forbids unknown keys so a typo in YAML or a ``--set`` override fails at
start-up with the offending key path instead of being silently ignored.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_pipeline.shards.format import ENCODE_EXTS


# The pixel budget of every decoder of untrusted images by default (ingest, training,
# eval, inspect, score): an image whose header declares more is never decoded.
MAX_PIXELS = 50_000_000


class InputError(ValueError):
    """What the user gave cannot be used (an input table without a needed column, an output
    directory that cannot be written), found before any work starts: the CLI reports it as
    a usage error (exit status 2), naming the file, column or key."""


class FetchConfig(BaseModel):
    """How one URL is downloaded: timeouts, limits, retries and politeness."""

    model_config = ConfigDict(extra="forbid")

    connect_timeout_s: float = Field(5.0, gt=0)
    # Overall budget for one attempt, body included, so a trickling server cannot hang us.
    deadline_s: float = Field(20.0, gt=0)
    max_bytes: int = Field(10_000_000, gt=0)
    retries: int = Field(2, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    user_agent: str = Field("vlm-ingest/0.1", min_length=1)
    # Requests/s per host for the whole run (split evenly over the shard tasks running at
    # once); 0 = unlimited.
    rate_limit_per_domain: float = Field(0.0, ge=0)
    max_redirects: int = Field(3, ge=0)
    # Host names, addresses or networks (10.0.0.0/8) fetched even though they are not
    # globally routable; a name allows every address it resolves to.
    allow_private_hosts: list[str] = Field(default_factory=list)
    respect_robots_header: bool = True
    # Seconds a host's resolved addresses are reused: one DNS lookup per host per task and
    # period, however many of its URLs the task fetches (no DNS floods).
    dns_cache_s: float = Field(300.0, ge=0)
    # Host name -> addresses to use instead of DNS, like curl's --resolve. The addresses
    # are checked like resolved ones (a private one is refused unless allow-listed).
    resolve: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("allow_private_hosts")
    @classmethod
    def _names_or_networks(cls, value: list[str]) -> list[str]:
        out = []
        for entry in value:
            name = entry.strip().lower()
            last = name.rstrip(".").rpartition(".")[2]
            try:
                ip = ipaddress.ip_network(name) if "/" in name else ipaddress.ip_address(name)
                out.append(str(ip))
            except ValueError:
                # Like ingest's URL check: a numeric last label means an address, and only
                # canonical spellings are addresses (127.1 would never match a URL).
                if not name or "/" in name or ":" in name or re.fullmatch(r"0x[0-9a-f]*|[0-9]+", last):
                    raise ValueError(f"allow_private_hosts: {entry!r} is not a host name, an IP "
                                     "address (a.b.c.d or IPv6) or a network (10.0.0.0/8)") from None
                out.append(name)
        return out

    @field_validator("resolve")
    @classmethod
    def _addresses_are_ips(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for host, addresses in value.items():
            if not addresses:
                raise ValueError(f"resolve.{host}: needs at least one address")
            for a in addresses:
                try:
                    ipaddress.ip_address(a)
                except ValueError:
                    raise ValueError(f"resolve.{host}: {a!r} is not an IP address") from None
        return {h.lower(): a for h, a in value.items()}


class IngestConfig(BaseModel):
    """Turning a URL+caption table into webdataset shards."""

    model_config = ConfigDict(extra="forbid")

    url_col: str = "url"
    caption_col: str = "caption"
    shard_size: int = Field(10_000, gt=0)
    threads: int = Field(16, gt=0)  # downloads in flight per shard task
    # Rows decoded/resized/encoded at once per shard task (each task reserves one CPU).
    # The download threads take turns here, so 16 of them do not fight over one core.
    decode_threads: int = Field(1, gt=0)
    # side of the stored images (img2dataset's default); independent of any model:
    # training and evaluation resize and centre-crop shards of any size to the model's input
    image_size: int = Field(256, gt=0)
    resize_mode: Literal["keep_ratio", "center_crop", "border", "no"] = "center_crop"
    # shrinking filter: box = area averaging (OpenCV's INTER_AREA); enlarging is bicubic
    downscale: Literal["box", "bicubic", "lanczos"] = "box"
    encode_format: Literal[ENCODE_EXTS] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    min_image_size: int = Field(0, ge=0)  # shorter side of the original, pixels
    max_image_size: int = Field(0, ge=0)  # longer side of the original; 0 = no limit
    max_aspect_ratio: float = Field(10.0, ge=1.0)
    min_caption_words: int = Field(1, ge=0)
    max_caption_words: int = Field(0, ge=0)  # 0 = no limit
    min_caption_length: int = Field(0, ge=0)  # characters
    max_caption_length: int = Field(0, ge=0)  # characters; 0 = no limit
    # Keep a caption only if an offline detector (py3langid) names one of these ISO 639
    # codes with at least ``min_language_score``; empty = no language filter.
    languages: list[str] = Field(default_factory=list)
    min_language_score: float = Field(0.0, ge=0.0, le=1.0)
    # Drop an image whose bytes (sha256) another row of the run already delivered.
    dedup: bool = True
    max_pixels: int = Field(MAX_PIXELS, gt=0)  # decompression-bomb guard
    task_retries: int = Field(3, ge=0)
    fetch: FetchConfig = Field(default_factory=FetchConfig)

    @field_validator("languages")
    @classmethod
    def _iso_codes(cls, value: list[str]) -> list[str]:
        for code in value:
            if not (len(code) in (2, 3) and code.isalpha() and code.islower()):
                raise ValueError(f"languages: {code!r} is not a lowercase ISO 639 code like 'en'")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> "IngestConfig":
        if self.max_image_size and self.max_image_size < self.min_image_size:
            raise ValueError(f"max_image_size ({self.max_image_size}) < min_image_size ({self.min_image_size})")
        if self.max_caption_words and self.max_caption_words < self.min_caption_words:
            raise ValueError(f"max_caption_words ({self.max_caption_words}) < min_caption_words "
                             f"({self.min_caption_words})")
        if self.max_caption_length and self.max_caption_length < self.min_caption_length:
            raise ValueError(f"max_caption_length ({self.max_caption_length}) < min_caption_length "
                             f"({self.min_caption_length})")
        return self


class ScoreConfig(BaseModel):
    """`vlm data score`: per-sample perceptual hash and CLIP score over committed shards."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = None  # run or checkpoint dir of this system; None = hashes only
    batch_size: int = Field(64, gt=0)
    actors: int = Field(0, ge=0)  # 0 = one per GPU, else one per 2 CPUs (at least one)
    hash_size: int = Field(8, ge=4, le=16)  # pHash of hash_size² bits
    # decompression-bomb guard, as ingest's: an image declaring more pixels is never decoded
    max_pixels: int = Field(MAX_PIXELS, gt=0)


class FilterConfig(BaseModel):
    """`vlm data filter`: rules over the scores that choose the samples of a new shard set."""

    model_config = ConfigDict(extra="forbid")

    min_clip_score: float | None = None
    top_fraction: float | None = Field(None, gt=0, le=1)  # the best fraction by CLIP score
    # Near-duplicates: pHashes within this Hamming distance; the higher CLIP score (else the
    # first key) is kept. -1 = off.
    near_dup_distance: int = Field(4, ge=-1, le=32)
    shard_size: int = Field(10_000, gt=0)
