"""RoI-align in pure torch (torchvision is not a dependency), for region–word matching.

Region features pooled from a feature map by bilinear sampling, for region–word matching."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def roi_align(features: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor, *,
              output_size: int = 2, sampling_ratio: int = 2) -> torch.Tensor:
    """features [B, C, H, W]; boxes [N, 4] (x0, y0, x1, y1) as fractions of the image's width
    and height, in [0, 1]; batch_index [N] the image of each box -> [N, C, output_size, output_size].

    Each output bin is the mean of sampling_ratio² bilinear samples spread evenly inside it
    (RoI-align with aligned=True: feature pixel k covers [k, k+1) of the map, so a box edge
    at fraction u sits at u·W, with no half-pixel shift and no rounding). Samples are clamped
    to the map's border, as torchvision's roi_align clamps them. Differentiable in features
    (not in the boxes, which are labels here)."""
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {tuple(boxes.shape)}")
    if boxes.shape[0] != batch_index.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {batch_index.shape[0]} batch indices")
    n, s, r = boxes.shape[0], output_size, sampling_ratio
    # sample offsets inside the box as fractions of its size: bin i, sample k -> (i + (k+0.5)/r)/s
    frac = ((torch.arange(s, device=boxes.device)[:, None]
             + (torch.arange(r, device=boxes.device)[None, :] + 0.5) / r) / s).reshape(-1).to(features.dtype)
    b = boxes.to(features.dtype)
    xs = b[:, 0:1] + (b[:, 2:3] - b[:, 0:1]) * frac  # [N, s*r]
    ys = b[:, 1:2] + (b[:, 3:4] - b[:, 1:2]) * frac
    grid = torch.stack([xs[:, None, :].expand(n, s * r, s * r), ys[:, :, None].expand(n, s * r, s * r)], dim=-1)
    sampled = F.grid_sample(features[batch_index], 2 * grid - 1, mode="bilinear", padding_mode="border",
                            align_corners=False)  # [N, C, s*r, s*r]
    return sampled.view(n, -1, s, r, s, r).mean(dim=(3, 5))
