"""Turns raw shard samples into model batches (decode, normalise, tokenise)."""
from __future__ import annotations

import hashlib
import io
import time
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from data_pipeline.reader import ShardReader
from vlm.augment import AugmentConfig, colour_augment, two_views
from vlm.config import ColourAugmentConfig
from vlm.tokenizer import TextEncoder

IMAGE_EXTS = ("jpg", "png", "webp")


def decode_image(sample: dict, image_size: int,
                 transform: Callable[[Image.Image], Image.Image] | None = None) -> torch.Tensor:
    """-> [3, S, S] float in [-1, 1]; `transform` (e.g. the colour augmentation's) is applied
    to the decoded RGB image before resizing."""
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__shard__')} has no image")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if transform is not None:
        img = transform(img)
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


def image_id(sample: dict) -> int:
    """A stable int64 naming the sample's image: equal for two samples (e.g. two captions)
    of the same image bytes, so that image–text matching never draws one as the other's
    negative. The ingested sha256 when the metadata has one, else a hash of the bytes; a
    sample the colour augmentation changed ("__variant__") is another picture."""
    digest = sample.get("json", {}).get("sha256")
    if not digest:
        data = next((sample[e] for e in IMAGE_EXTS if e in sample), b"")
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if sample.get("__variant__"):
        digest = f"{digest}:{sample['__variant__']}"
    return label_id(digest)


def region_fields(samples: list[dict], text: TextEncoder) -> dict[str, torch.Tensor]:
    """Each sample's metadata "regions" ([{"box": [x0, y0, x1, y1] in fractions of the image
    side, "phrase": str}, ...]) -> "boxes" [B, R, 4], "box_valid" [B, R] bool, "phrase_ids"
    [B, R] (label_id of the phrase, NO_LABEL where padded), "phrase_tokens" [B, R, L],
    "phrase_eot" [B, R]; R = the most regions of any sample (at least 1)."""
    per_sample = []
    for s in samples:
        regions = s.get("json", {}).get("regions")
        if regions is None:
            raise ValueError(f"sample {s.get('__key__')} in {s.get('__shard__')} has no 'regions' metadata, "
                             f"which region-word matching needs (ingest a table with a regions column)")
        for r in regions:
            box = r.get("box") if isinstance(r, dict) else None
            if not r.get("phrase") or box is None or len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError(f"sample {s.get('__key__')} in {s.get('__shard__')}: bad region {r!r} "
                                 f"(need a phrase and a box [x0, y0, x1, y1] with x0 < x1, y0 < y1)")
        per_sample.append(regions)
    b, r = len(samples), max(1, max(len(x) for x in per_sample))
    boxes = torch.zeros(b, r, 4)
    valid = torch.zeros(b, r, dtype=torch.bool)
    ids = torch.full((b, r), NO_LABEL, dtype=torch.long)
    phrases = [""] * (b * r)
    for i, regions in enumerate(per_sample):
        for j, region in enumerate(regions):
            boxes[i, j] = torch.tensor([float(v) for v in region["box"]]).clamp(0.0, 1.0)
            valid[i, j] = True
            ids[i, j] = label_id(region["phrase"])
            phrases[i * r + j] = region["phrase"]
    tokens, eot = text(phrases)
    return {"boxes": boxes, "box_valid": valid, "phrase_ids": ids,
            "phrase_tokens": tokens.view(b, r, -1), "phrase_eot": eot.view(b, r)}


class BatchLoader:
    """Yields {"images": [B,3,S,S], "tokens": [B,L], "eot_index": [B], "labels": [B]} and,
    when `views` is set, "views": [2B,3,S,S] (two augmentations of each image); resumable.
    `needs` (the union of the objectives' needs) adds fields only when asked for:
    "image_ids" [B] (see image_id) and, for "regions", the box and phrase fields of
    region_fields. Other names in `needs` (model outputs) are not batch fields and are ignored.

    `colour` (data.colour_augment) shows a share of the samples in greyscale, renaming the
    colour words of their caption, label and region phrases (vlm.augment).
    The views' and the colour augmentation's randomness is seeded from (seed, rank, batch
    number), so a resumed run draws the same augmentations without storing generator state."""

    def __init__(self, reader: ShardReader, text: TextEncoder, *, batch_size: int, image_size: int,
                 label_field: str | None = None, views: AugmentConfig | None = None, seed: int = 0,
                 needs: frozenset[str] = frozenset(), colour: ColourAugmentConfig | None = None):
        self.reader, self.text = reader, text
        self.batch_size, self.image_size = batch_size, image_size
        self.label_field, self.views, self.seed = label_field, views, seed
        self.colour = colour if colour is not None and colour.enabled else None
        self.needs = frozenset(needs)
        self._it: Iterator[dict] | None = None
        self.batches = 0
        self.last_wait_s = 0.0

    def next_batch(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        if self._it is None:
            self._it = iter(self.reader)
        samples = [next(self._it) for _ in range(self.batch_size)]
        transforms = [None] * len(samples)
        if self.colour is not None:
            g = torch.Generator().manual_seed(hash((self.seed, self.reader.rank, self.batches, 1)) & 0xFFFF_FFFF)
            for i, draw in enumerate(torch.rand(len(samples), generator=g).tolist()):
                samples[i], transforms[i] = colour_augment(samples[i], self.colour, draw, self.label_field)
        images = torch.stack([decode_image(s, self.image_size, t) for s, t in zip(samples, transforms)])
        tokens, eot = self.text([s.get("txt", "") for s in samples])
        batch = {"images": images, "tokens": tokens, "eot_index": eot}
        if self.label_field:
            batch["labels"] = torch.tensor([label_id(s.get("json", {}).get(self.label_field)) for s in samples])
        if "image_ids" in self.needs:
            batch["image_ids"] = torch.tensor([image_id(s) for s in samples])
        if "regions" in self.needs:
            batch.update(region_fields(samples, self.text))
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

    def load_rank_states(self, states: list[dict]) -> None:
        """Every rank's state of a run saved at another world size (the reader re-splits
        what is left of the epoch)."""
        self.reader.load_rank_states(states)
        self.batches = max(s.get("batches", 0) for s in states)
        self._it = None
