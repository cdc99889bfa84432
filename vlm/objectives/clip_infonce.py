"""Symmetric image–text InfoNCE (survey eq. 2–3, CLIP)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlm.distributed import gather_features, world

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps 1/T at 100 for stability


def clip_infonce(*, image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor,
                 **_: torch.Tensor) -> dict[str, torch.Tensor]:
    """image_embed, text_embed: [b, E] L2-normalised local rows; logit_scale: [1] = log(1/T).

    Each rank scores its own rows against every rank's columns; with equal local batches
    the mean over ranks equals the loss on the concatenated global batch."""
    rank, _ = world()
    all_image = gather_features(image_embed)
    all_text = gather_features(text_embed)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    b = image_embed.shape[0]
    labels = torch.arange(b, device=image_embed.device) + rank * b
    loss_i2t = F.cross_entropy(scale * image_embed @ all_text.T, labels)
    loss_t2i = F.cross_entropy(scale * text_embed @ all_image.T, labels)
    return {"clip_infonce": 0.5 * (loss_i2t + loss_t2i)}
