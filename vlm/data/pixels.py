"""The image pipelines of training and evaluation, and the normalisation they share.

Training (CPU, in the data workers): the image is decoded at the smallest JPEG scale that
still covers the output (Pillow's draft mode), a random resized crop is cut from it (area
share `scale`, aspect ratio `ratio`, log-uniform, as OpenCLIP's default training transform
with scale (0.9, 1.0)) and resized to S x S with bicubic filtering, kept as uint8 HWC.
Evaluation: resized so the shorter side is S, then centre-cropped to S x S (computed as
one resize of the centre square, the same pixels with one resampling).

Both leave normalisation to the consumer: a batch crosses process boundaries and the
host-to-device copy as uint8 (a quarter of float32's bytes) and is normalised on the
device with the model's mean and std (`normalise`); CLIP's are the default
(vlm.models.config.VisionConfig.image_mean/image_std)."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Box = tuple[float, float, float, float]


def centre_square(width: int, height: int) -> Box:
    """The (left, top, right, bottom) box of the centre square of a width x height image."""
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2


def random_resized_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: random.Random) -> Box:
    """A crop box of area share in `scale` and aspect ratio (w / h) in `ratio` (log-uniform),
    at a uniform position; after 10 draws that do not fit, the centre crop of the image with
    its aspect ratio clamped into `ratio` (the standard RandomResizedCrop definition)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """The evaluation transform: `img` resized so its shorter side is `size`, then
    centre-cropped to `size` x `size` (one bicubic resize of the centre square), so images
    of any shape feed a model without squashing. One already at `size` x `size` is kept."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    return img.resize((size, size), Image.BICUBIC, box=None if w == h else centre_square(w, h))


def draft(img: Image.Image, size: int, min_share: float = 1.0) -> Image.Image:
    """Lets a JPEG decode at 1/2, 1/4 or 1/8 scale when that still leaves at least
    `size` / sqrt(`min_share`) pixels a side (a crop of `min_share` of the area then still
    covers `size`): decoding is most of a loader's time, and most of it saved this way.
    Other formats are unchanged. Call before the pixels are loaded."""
    if img.format == "JPEG":
        side = math.ceil(size / math.sqrt(min_share))
        img.draft("RGB", (side, side))
    return img


def train_crop(img: Image.Image, size: int, scale: tuple[float, float], ratio: tuple[float, float],
               rng: random.Random) -> Image.Image:
    """The training transform: a random resized crop of `img` at `size` x `size` (bicubic)."""
    box = random_resized_box(*img.size, scale, ratio, rng)
    return img.resize((size, size), Image.BICUBIC, box=box)


def to_uint8_hwc(img: Image.Image) -> torch.Tensor:
    """RGB image -> [H, W, 3] uint8."""
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def normalise(images: torch.Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD,
              *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, 3] (as the loader makes them) or float [B, 3, H, W] in [0, 1] ->
    float [B, 3, H, W] normalised with `mean` and `std` (per channel, of the [0, 1] scale),
    on the tensor's device."""
    if images.dtype == torch.uint8:
        # one contiguous float copy, then scale and shift in place: (x / 255 - m) / s
        out = torch.empty(images.shape[0], 3, *images.shape[1:3], dtype=dtype, device=images.device)
        out.copy_(images.permute(0, 3, 1, 2))
        m = torch.tensor(mean, dtype=dtype, device=images.device).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=dtype, device=images.device).view(1, 3, 1, 1)
        return out.mul_(1.0 / (255.0 * s)).sub_(m / s)
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def unit_range(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1]."""
    return images.permute(0, 3, 1, 2).to(dtype).div_(255.0)


def tower_norm(tower) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the image tower `tower` expects (vlm.models.registry.build_vision sets them)."""
    return getattr(tower, "image_mean", CLIP_MEAN), getattr(tower, "image_std", CLIP_STD)


def image_tensor(img: Image.Image, mean: tuple[float, ...] = CLIP_MEAN,
                 std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """One RGB image (already at its final size) -> [3, H, W] float, normalised."""
    return normalise(to_uint8_hwc(img)[None], mean, std)[0]
