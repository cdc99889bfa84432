"""Turns raw shard samples into model batches (decode, normalise, tokenise)."""
from __future__ import annotations

import io
import time
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from data_pipeline.reader import ShardReader
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


class BatchLoader:
    """Yields {"images": [B,3,S,S], "tokens": [B,L], "eot_index": [B]}; resumable."""

    def __init__(self, reader: ShardReader, text: TextEncoder, *, batch_size: int, image_size: int):
        self.reader, self.text = reader, text
        self.batch_size, self.image_size = batch_size, image_size
        self._it: Iterator[dict] | None = None
        self.last_wait_s = 0.0

    def next_batch(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        if self._it is None:
            self._it = iter(self.reader)
        samples = [next(self._it) for _ in range(self.batch_size)]
        images = torch.stack([decode_image(s, self.image_size) for s in samples])
        tokens, eot = self.text([s.get("txt", "") for s in samples])
        self.last_wait_s = time.perf_counter() - t0
        return {"images": images, "tokens": tokens, "eot_index": eot}

    def state_dict(self) -> dict:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)
        self._it = None
