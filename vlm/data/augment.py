"""Batch augmentations for the image–image objective (two views per image, SimCLR-style),
and the caption-consistent greyscale augmentation of training samples (the caption's
colour words renamed to match).

Done on whole batches with one affine grid per sample (crop scale, aspect ratio, position,
horizontal flip) and per-sample brightness/contrast, so a batch of views costs two tensor
ops instead of a PIL pipeline per image. The views never change hue: in the demo corpus
(and often on the web) colour is part of what the caption says, which is why the greyscale
augmentation renames the caption's colour words when it takes the image's colours away."""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from PIL import Image

from vlm.data.config import AugmentConfig, ColourAugmentConfig


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """images [B, 3, S, S] in [0, 1] (before normalisation) -> one augmented view, same
    shape and range. cfg.brightness is a share of the range's half-width."""
    b = images.shape[0]
    area = _uniform(b, *cfg.crop_scale, generator)
    log_ratio = _uniform(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), generator)
    ratio = log_ratio.exp()
    # crop width/height as fractions of the image, clipped to fit
    w = (area * ratio).sqrt().clamp(max=1.0)
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(b, generator=generator) - 1)  # centre offset in [-(1-w), 1-w]
    cy = (1 - h) * (2 * torch.rand(b, generator=generator) - 1)
    flip = torch.where(torch.rand(b, generator=generator) < cfg.flip_prob, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright = 0.5 * _uniform(b, -cfg.brightness, cfg.brightness, generator).to(images).view(b, 1, 1, 1)
    contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, generator).to(images).view(b, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + bright).clamp(0, 1)


def two_views(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, 3, S, S] -> [2B, 3, S, S]: all first views, then all second views."""
    return torch.cat([augment(images, cfg, generator), augment(images, cfg, generator)])


# ---- caption-consistent greyscale (data.colour_augment) ----

_WORDS = re.compile(r"([A-Za-z]+)")


def rename_colours(text: str, words: Iterable[str], new: str) -> str:
    """Every colour word of `words` in `text` (whole words, any case) -> `new`, capitalised
    where the word was, with an "a"/"an" just before it made to fit `new`."""
    words = frozenset(words)  # the same object when given a frozenset
    parts = _WORDS.split(text)  # odd indices are words
    for i in range(1, len(parts), 2):
        if parts[i].lower() not in words:
            continue
        parts[i] = new.capitalize() if parts[i][0].isupper() else new
        if i >= 3 and parts[i - 2].lower() in ("a", "an") and parts[i - 1].isspace():
            article = "an" if new[0] in "aeiou" else "a"
            parts[i - 2] = article.capitalize() if parts[i - 2][0].isupper() else article
    return "".join(parts)


def greyscale_image(img: Image.Image) -> Image.Image:
    return img.convert("L").convert("RGB")


def colour_augment(sample: dict, cfg: ColourAugmentConfig, draw: float,
                   label_field: str | None = None) -> tuple[dict, Callable[[Image.Image], Image.Image] | None]:
    """One training sample and a uniform draw in [0, 1) -> (the sample to use, the image
    transform or None). draw < cfg.greyscale: the image is shown in greyscale and the
    caption ("txt"), the class label (json[label_field]) and the region phrases
    (json["regions"][*]["phrase"]) have their colour words renamed grey_word; the sample
    is marked "__variant__" so that its image id differs from the original's. Otherwise
    unchanged."""
    if draw >= cfg.greyscale:
        return sample, None
    words, new = frozenset(cfg.colour_words), cfg.grey_word  # one set for every field renamed
    out = dict(sample)
    out["txt"] = rename_colours(sample.get("txt", ""), words, new)
    meta = dict(sample.get("json") or {})
    if label_field and isinstance(meta.get(label_field), str):
        meta[label_field] = rename_colours(meta[label_field], words, new)
    if isinstance(meta.get("regions"), list):
        meta["regions"] = [dict(r, phrase=rename_colours(r["phrase"], words, new))
                           if isinstance(r, dict) and isinstance(r.get("phrase"), str) else r
                           for r in meta["regions"]]
    out["json"] = meta
    out["__variant__"] = "grey"  # vlm.data.batches.image_id: another picture than the original
    return out, greyscale_image
