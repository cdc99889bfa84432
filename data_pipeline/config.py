"""Typed config slices for the data pipeline (synthetic corpus, fetching, ingestion).

Each model forbids unknown keys so a typo in YAML or a ``--set`` override fails at
start-up with the offending key path instead of being silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CorpusConfig(BaseModel):
    """The procedural colour/shape corpus used for tests and smoke runs."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    num_train: int = Field(6000, ge=0)
    num_heldout: int = Field(600, ge=0)
    image_size: int = Field(64, ge=16, le=4096)
    broken_urls: bool = True


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
    rate_limit_per_domain: float = Field(0.0, ge=0)  # requests/s per host; 0 = unlimited
    max_redirects: int = Field(3, ge=0)
    allow_private_hosts: list[str] = Field(default_factory=list)
    respect_robots_header: bool = True


class IngestConfig(BaseModel):
    """Turning a URL+caption table into webdataset shards."""

    model_config = ConfigDict(extra="forbid")

    url_col: str = "url"
    caption_col: str = "caption"
    shard_size: int = Field(10_000, gt=0)
    threads: int = Field(16, gt=0)
    image_size: int = Field(32, gt=0)
    resize_mode: Literal["keep_ratio", "center_crop", "border", "no"] = "center_crop"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    min_image_size: int = Field(0, ge=0)
    max_aspect_ratio: float = Field(10.0, ge=1.0)
    min_caption_words: int = Field(1, ge=0)
    max_pixels: int = Field(50_000_000, gt=0)  # decompression-bomb guard
    task_retries: int = Field(3, ge=0)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
