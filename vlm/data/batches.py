"""Turns raw shard samples into uint8 model batches (check, decode, crop, tokenise), one reader slot at a time."""
from __future__ import annotations

import functools
import hashlib
import random
from collections import Counter, deque
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from data_pipeline.config import MAX_PIXELS
from data_pipeline.ingest.codec import Rejected, open_image
from data_pipeline.shards.format import IMAGE_EXTS
from data_pipeline.shards.reader import ShardReader
from vlm.data.config import ColourAugmentConfig, CropConfig
from vlm.data.augment import colour_augment
from vlm.data.pixels import CLIP_MEAN, CLIP_STD, draft, fit_square, image_tensor, train_crop
from vlm.data.tokenizer import TextEncoder

WARN_LIMIT = 100  # bad samples a loader names one by one; the rest are only counted


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` is one of vlm.observe.metrics.BAD_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BadDataError(ValueError):
    """Too many bad samples in a row of reads (data.max_bad_sample_ratio): the data is broken."""


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__')} in {sample.get('__shard__')}"


def load_rgb(sample: dict, *, max_pixels: int = MAX_PIXELS,
             prepare: Callable[[Image.Image], Image.Image] | None = None) -> Image.Image:
    """The sample's image decoded to RGB, at most `max_pixels` pixels (read from the header
    before decoding, data_pipeline.ingest.codec.open_image); `prepare` sees the image opened
    but not decoded (e.g. vlm.data.pixels.draft). Raises BadSample."""
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        raise BadSample("no_image", f"{_where(sample)} has no image")
    try:
        img = open_image(data, max_pixels)
        if prepare is not None:
            img = prepare(img)
        img.load()  # the pixels, within the budget just checked
        return img.convert("RGB")
    except Rejected as e:
        detail = (f"{e} (pixel budget data.ingest.max_pixels)" if e.reason == "too_many_pixels"
                  else f"cannot decode the image ({e})")
        raise BadSample(e.reason, f"{_where(sample)}: {detail}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
        raise BadSample("decode_error", f"{_where(sample)}: cannot decode the image "
                        f"({type(e).__name__}: {e})") from None


def decode_image(sample: dict, image_size: int,
                 transform: Callable[[Image.Image], Image.Image] | None = None, *,
                 max_pixels: int = MAX_PIXELS, mean: tuple[float, ...] = CLIP_MEAN,
                 std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """-> [3, S, S] float normalised with `mean`/`std` through the evaluation transform
    (vlm.data.pixels.fit_square); `transform` (e.g. the colour augmentation's) is applied
    first. Raises BadSample."""
    img = load_rgb(sample, max_pixels=max_pixels)
    if transform is not None:
        img = transform(img)
    return image_tensor(fit_square(img, image_size), mean, std)


def check_sample(sample: dict, *, max_pixels: int = MAX_PIXELS,
                 prepare: Callable[[Image.Image], Image.Image] | None = None) -> Image.Image:
    """What a training sample needs: metadata and a caption that decoded, a caption, an image
    within the pixel budget. -> its RGB image; raises BadSample."""
    if "__bad__" in sample:  # set by the shard reader
        reason, detail = sample["__bad__"]
        raise BadSample(reason, f"{_where(sample)}: {detail}")
    if "txt" not in sample:
        raise BadSample("no_caption", f"{_where(sample)} has no caption (txt)")
    return load_rgb(sample, max_pixels=max_pixels, prepare=prepare)


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


def sample_id(sample: dict) -> str:
    """"EPOCH SHARD/KEY": which sample of which pass over the data (the shard reader's
    "__epoch__", or "d" and its draw number when it resamples; the shard's file name), for
    the sample-id log (data.log_sample_ids)."""
    epoch = sample.get("__epoch__", f"d{sample.get('__draw__', '')}")
    shard = str(sample.get("__shard__", "?")).rstrip("/").rsplit("/", 1)[-1]
    return f"{epoch} {shard}/{sample.get('__key__')}"


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
    """One reader slot's batches, made on the CPU (in a data worker process, vlm.data.loader):
    {"images": [B, S, S, 3] uint8, "tokens": [B, L], "eot_index": [B], "labels": [B]}.
    `needs` (the union of the objectives' needs) adds fields only when asked for:
    "image_ids" [B] (see image_id), for "regions", the box and phrase fields of
    region_fields, and for "sample_ids" a list of B sample_id strings. Other names in
    `needs` (model outputs) are not batch fields and are ignored.
    Normalisation and the two views of image–image objectives are left to the device
    (vlm.data.loader.TrainLoader).

    Each image goes through the training transform (vlm.data.pixels.train_crop: a random
    resized crop of `crop`), or the evaluation one when `crop` is None. `colour`
    (data.colour_augment) shows a share of the samples in greyscale, renaming the colour
    words of their caption, label and region phrases (vlm.data.augment). The randomness is
    seeded from (seed, slot, batch number), so a resumed run draws the same crops without
    storing generator state.

    A bad sample (check_sample: no image, an undecodable one, one over `max_pixels`, no or
    an undecodable caption or metadata) is skipped, counted by reason (`bad_counts`, and
    `last_bad` for the last batch) and named in a warning; the reader has consumed it, so a
    resume continues exactly. More than `max_bad_ratio` of the last `bad_window` samples read
    being bad raises BadDataError naming the shards: the data is broken, not a few samples."""

    def __init__(self, reader: ShardReader, text: TextEncoder, *, batch_size: int, image_size: int,
                 label_field: str | None = None, seed: int = 0, needs: frozenset[str] = frozenset(),
                 colour: ColourAugmentConfig | None = None, crop: CropConfig | None = None,
                 max_pixels: int = MAX_PIXELS, max_bad_ratio: float = 0.5, bad_window: int = 1000):
        self.reader, self.text = reader, text
        self.batch_size, self.image_size = batch_size, image_size
        self.label_field, self.seed, self.crop = label_field, seed, crop
        self.colour = colour if colour is not None and colour.enabled else None
        self.needs = frozenset(needs)
        self.max_pixels, self.max_bad_ratio, self.bad_window = max_pixels, max_bad_ratio, bad_window
        self._it: Iterator[dict] | None = None
        self.batches = 0
        self.bad_counts: Counter[str] = Counter()  # since the run began (kept in the state)
        self.last_bad: Counter[str] = Counter()    # in the last next_batch
        self._recent: deque[str | None] = deque(maxlen=bad_window)  # shard of each bad read, None if good
        self._warned = 0
        min_share = crop.scale[0] if crop is not None else 1.0
        self._draft = functools.partial(draft, size=image_size, min_share=min_share)

    def _seed(self, stream: int) -> int:
        return hash((self.seed, self.reader.rank, self.reader.worker, self.batches, stream)) & 0xFFFF_FFFF

    def _skip(self, sample: dict, bad: BadSample) -> None:
        self.bad_counts[bad.reason] += 1
        self.last_bad[bad.reason] += 1
        self._recent.append(sample.get("__shard__", "?"))
        if self._warned < WARN_LIMIT:
            self._warned += 1
            more = " (further bad samples are counted, not named)" if self._warned == WARN_LIMIT else ""
            print(f"warning: rank {self.reader.rank}: skipped {bad.reason}: {bad}{more}", flush=True)
        bad_reads = sum(s is not None for s in self._recent)
        if len(self._recent) == self.bad_window and (bad_reads > self.max_bad_ratio * self.bad_window
                                                     or bad_reads == self.bad_window):
            shards = Counter(s for s in self._recent if s is not None)
            raise BadDataError(
                f"rank {self.reader.rank}: {bad_reads} of the last {self.bad_window} samples read were bad "
                f"(data.max_bad_sample_ratio: {self.max_bad_ratio}; by reason so far: "
                f"{', '.join(f'{r} {n}' for r, n in self.bad_counts.most_common())}); the data is broken in "
                + ", ".join(f"{url} ({n} bad)" for url, n in shards.most_common(5))
                + (f" and {len(shards) - 5} more shard(s)" if len(shards) > 5 else "")
                + ": fix or remove these shards (`vlm data inspect` them), or raise data.max_bad_sample_ratio")

    def _good_samples(self) -> tuple[list[dict], list[Image.Image]]:
        """The next batch_size samples that check_sample accepts, with their images."""
        samples, images = [], []
        while len(samples) < self.batch_size:
            sample = next(self._it)
            try:
                images.append(check_sample(sample, max_pixels=self.max_pixels, prepare=self._draft))
            except BadSample as bad:
                self._skip(sample, bad)
                continue
            self._recent.append(None)
            samples.append(sample)
        return samples, images

    def _pixels(self, pictures: list[Image.Image], transforms: list) -> torch.Tensor:
        """The batch's images through the training (or evaluation) transform -> [B, S, S, 3] uint8."""
        rng = random.Random(self._seed(2))
        # filled in numpy, one tensor at the end: a torch row copy per image is split among
        # torch's threads, which costs more than the copy (3x in the training process)
        out = np.empty((len(pictures), self.image_size, self.image_size, 3), dtype=np.uint8)
        for i, (img, transform) in enumerate(zip(pictures, transforms)):
            if transform is not None:
                img = transform(img)
            img = (fit_square(img, self.image_size) if self.crop is None
                   else train_crop(img, self.image_size, self.crop.scale, self.crop.ratio, rng))
            out[i] = np.asarray(img)
        return torch.from_numpy(out)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.reader)
        self.last_bad = Counter()
        samples, pictures = self._good_samples()
        transforms = [None] * len(samples)
        if self.colour is not None:
            g = torch.Generator().manual_seed(self._seed(1))
            for i, draw in enumerate(torch.rand(len(samples), generator=g).tolist()):
                samples[i], transforms[i] = colour_augment(samples[i], self.colour, draw, self.label_field)
        tokens, eot = self.text([s.get("txt", "") for s in samples])
        batch = {"images": self._pixels(pictures, transforms), "tokens": tokens, "eot_index": eot}
        if self.label_field:
            batch["labels"] = torch.tensor([label_id(s.get("json", {}).get(self.label_field)) for s in samples])
        if "image_ids" in self.needs:
            batch["image_ids"] = torch.tensor([image_id(s) for s in samples])
        if "regions" in self.needs:
            batch.update(region_fields(samples, self.text))
        if "sample_ids" in self.needs:
            batch["sample_ids"] = [sample_id(s) for s in samples]
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        recent = list(self._recent)
        return {**self.reader.state_dict(), "batches": self.batches, "bad_samples": dict(self.bad_counts),
                "bad_window": {"read": len(recent), "bad": [[i, s] for i, s in enumerate(recent) if s is not None]}}

    def _load_bad(self, state: dict) -> None:
        self.bad_counts = Counter(state.get("bad_samples", {}))
        window = state.get("bad_window", {"read": 0, "bad": []})
        recent: list[str | None] = [None] * window["read"]
        for i, shard in window["bad"]:
            recent[i] = shard
        self._recent = deque(recent, maxlen=self.bad_window)

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)
        self.batches = state.get("batches", 0)
        self._load_bad(state)
        self._it = None

    def load_rank_states(self, states: list[dict]) -> None:
        """Every slot's state of a run saved at another world size or worker count (the
        reader re-splits what is left of the epoch; the bad-sample counts carry over,
        summed into the first slot's, the window starts empty)."""
        self.reader.load_rank_states(states)
        self.batches = max(s.get("batches", 0) for s in states)
        total: Counter[str] = Counter()
        for s in states:
            total.update(s.get("bad_samples", {}))
        first_slot = self.reader.rank == 0 and self.reader.worker == 0
        self.bad_counts = total if first_slot else Counter()
        self._recent = deque(maxlen=self.bad_window)
        self._it = None
