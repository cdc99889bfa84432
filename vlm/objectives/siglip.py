"""Sigmoid image–text loss with a learnable temperature and bias (SigLIP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.distributed import gather_features, world
from vlm.kernels.contrastive import contrastive_loss
from vlm.kernels.dispatch import resolve
from vlm.objectives.clip_infonce import logit_scale_parameter
from vlm.objectives.configs import SigLIPConfig


def siglip(*, image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor,
           logit_bias: torch.Tensor, impl: str = "naive") -> torch.Tensor:
    """Loss of this rank. image_embed, text_embed: [b, E] L2-normalised local rows;
    logit_scale: [1] = log t; logit_bias: [1] = b.

    Global loss over B pairs: (1/B) Σ_i Σ_j -log σ(z_ij (t x_i·y_j + b)), z_ij = +1 when
    i = j and -1 otherwise. Every pair (i, j) is scored once, on the rank that owns image i
    (local images against all texts), so this rank returns its partial sum divided by its
    own b: the mean over ranks is then the global loss. impl: as in clip_infonce."""
    if impl != "naive":
        return contrastive_loss(image_embed, text_embed, logit_scale.exp(), logit_bias, kind="sigmoid", impl=impl)
    rank, _ = world()
    all_text = gather_features(text_embed)
    b = image_embed.shape[0]
    logits = logit_scale.exp() * image_embed @ all_text.T + logit_bias
    signs = -torch.ones_like(logits)
    own = torch.arange(b, device=image_embed.device)
    signs[own, own + rank * b] = 1.0
    return -F.logsigmoid(signs * logits).sum() / b


class SigLIP(nn.Module):
    name = "siglip"
    batch_coupled = True
    needs = frozenset({"image_embed", "text_embed"})
    kernels = "auto"  # RunConfig.kernels, set by build_objective

    def __init__(self, cfg: SigLIPConfig, *, embed_dim: int, vision_width: int):
        super().__init__()
        self.logit_scale = logit_scale_parameter(cfg.init_temperature, cfg.learn_temperature)
        self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_bias)))

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = siglip(image_embed=outputs["image_embed"], text_embed=outputs["text_embed"],
                      logit_scale=self.logit_scale, logit_bias=self.logit_bias,
                      impl=resolve(self.kernels, outputs["image_embed"].device))
        return {self.name: loss,
                f"{self.name}/temperature": (-self.logit_scale.detach()).exp()[0],
                f"{self.name}/bias": self.logit_bias.detach()[0]}
