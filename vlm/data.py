"""Turns raw shard samples into model batches (decode, normalise, tokenise)."""
from __future__ import annotations

import hashlib
import io
import time
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from data_pipeline.reader import ShardReader
from vlm.augment import AugmentConfig, two_views
from vlm.tokenizer import TextEncoder

IMAGE_EXTS = ("jpg", "png", "webp")


def decode_image(sample: dict, image_size: int) -> torch.Tensor:
    """-> [3, S, S] float in [-1, 1]."""
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__shard__')} has no image")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return arr / 127.5 - 1.0


NO_LABEL = -1


def label_id(value) -> int:
    """A label string -> a stable non-negative int64, the same on every rank and run,
    with no vocabulary to agree on (collisions at 2^-63 are ignored). None/"" -> NO_LABEL."""
    if value is None or value == "":
        return NO_LABEL
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class BatchLoader:
    """Yields {"images": [B,3,S,S], "tokens": [B,L], "eot_index": [B], "labels": [B]} and,
    when `views` is set, "views": [2B,3,S,S] (two augmentations of each image); resumable.

    The views' randomness is seeded from (seed, batch number), so a resumed run draws the
    same augmentations without storing generator state."""

    def __init__(self, reader: ShardReader, text: TextEncoder, *, batch_size: int, image_size: int,
                 label_field: str | None = None, views: AugmentConfig | None = None, seed: int = 0):
        self.reader, self.text = reader, text
        self.batch_size, self.image_size = batch_size, image_size
        self.label_field, self.views, self.seed = label_field, views, seed
        self._it: Iterator[dict] | None = None
        self.batches = 0
        self.last_wait_s = 0.0

    def next_batch(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        if self._it is None:
            self._it = iter(self.reader)
        samples = [next(self._it) for _ in range(self.batch_size)]
        images = torch.stack([decode_image(s, self.image_size) for s in samples])
        tokens, eot = self.text([s.get("txt", "") for s in samples])
        batch = {"images": images, "tokens": tokens, "eot_index": eot}
        if self.label_field:
            batch["labels"] = torch.tensor([label_id(s.get("json", {}).get(self.label_field)) for s in samples])
        if self.views is not None:
            g = torch.Generator().manual_seed(hash((self.seed, self.reader.rank, self.batches)) & 0xFFFF_FFFF)
            batch["views"] = two_views(images, self.views, g)
        self.batches += 1
        self.last_wait_s = time.perf_counter() - t0
        return batch

    def state_dict(self) -> dict:
        return {**self.reader.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)
        self.batches = state.get("batches", 0)
        self._it = None
