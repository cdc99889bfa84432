"""Batch augmentations for the image–image objective (two views per image, SimCLR-style).

Done on whole batches with one affine grid per sample (crop scale, aspect ratio, position,
horizontal flip) and per-sample brightness/contrast, so a batch of views costs two tensor
ops instead of a PIL pipeline per image. Hue is never changed: in the demo corpus (and
often on the web) colour is part of what the caption says."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlm.config import AugmentConfig


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """images [B, 3, S, S] in [-1, 1] -> one augmented view, same shape and range."""
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
    bright = _uniform(b, -cfg.brightness, cfg.brightness, generator).to(images).view(b, 1, 1, 1)
    contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, generator).to(images).view(b, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + bright).clamp(-1, 1)


def two_views(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, 3, S, S] -> [2B, 3, S, S]: all first views, then all second views."""
    return torch.cat([augment(images, cfg, generator), augment(images, cfg, generator)])
