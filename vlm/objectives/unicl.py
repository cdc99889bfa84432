"""Image–text–label contrastive loss (survey eq. 4–5, UniCL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.distributed import gather_features, gather_labels, world
from vlm.kernels.contrastive import contrastive_loss
from vlm.kernels.dispatch import resolve
from vlm.objectives.clip_infonce import MAX_LOGIT_SCALE, logit_scale_parameter
from vlm.objectives.configs import UniCLConfig


def unicl(*, image_embed: torch.Tensor, text_embed: torch.Tensor, labels: torch.Tensor,
          logit_scale: torch.Tensor, impl: str = "naive") -> torch.Tensor:
    """Loss of this rank. image_embed, text_embed: [b, E] L2-normalised local rows;
    labels: [b] int64, -1 = no label; logit_scale: [1] = log(1/T), clamped at log(100).

    Positives of row i, P(i): every global column with the same label as i, its own pair
    included. An unlabelled row keeps only its own pair, and is never a positive of a
    labelled one, so with no labels at all this is exactly clip_infonce. Row loss:
    -(1/|P(i)|) Σ_{k∈P(i)} log softmax_k. The survey sums rows; this takes the mean over
    rows, so the scale matches InfoNCE, and the mean of the two directions (the survey's
    sum / 2), like clip_infonce. impl: as in clip_infonce (naive builds [b, B] weights and
    logits; the tiled kernels never do)."""
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    if impl != "naive":
        return contrastive_loss(image_embed, text_embed, scale, kind="softmax", labels=labels, impl=impl)
    rank, _ = world()
    all_image = gather_features(image_embed)
    all_text = gather_features(text_embed)
    all_labels = gather_labels(labels)
    b = labels.shape[0]
    local = torch.arange(b, device=labels.device)
    positive = (labels[:, None] == all_labels[None, :]) & (labels[:, None] >= 0)
    positive[local, local + rank * b] = True
    weights = positive / positive.sum(dim=1, keepdim=True)  # [b, B], rows sum to 1
    loss_i2t = -(weights * F.log_softmax(scale * image_embed @ all_text.T, dim=1)).sum(1).mean()
    loss_t2i = -(weights * F.log_softmax(scale * text_embed @ all_image.T, dim=1)).sum(1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


class UniCL(nn.Module):
    name = "unicl"
    batch_coupled = True
    needs = frozenset({"image_embed", "text_embed", "labels"})
    kernels = "auto"  # RunConfig.kernels, set by build_objective

    def __init__(self, cfg: UniCLConfig, *, embed_dim: int, vision_width: int):
        super().__init__()
        self.logit_scale = logit_scale_parameter(cfg.init_temperature, cfg.learn_temperature)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = unicl(image_embed=outputs["image_embed"], text_embed=outputs["text_embed"],
                     labels=batch["labels"], logit_scale=self.logit_scale,
                     impl=resolve(self.kernels, outputs["image_embed"].device))
        temperature = (-self.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE)).exp()[0]
        return {self.name: loss, f"{self.name}/temperature": temperature}
