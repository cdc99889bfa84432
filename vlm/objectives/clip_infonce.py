"""Symmetric image–text InfoNCE (survey eq. 2–3, CLIP)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm.distributed import gather_features, world
from vlm.kernels.contrastive import contrastive_loss
from vlm.kernels.dispatch import resolve
from vlm.objectives.configs import ClipInfoNCEConfig


MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps 1/T at 100 so logits stay bounded


def clip_infonce(*, image_embed: torch.Tensor, text_embed: torch.Tensor,
                 logit_scale: torch.Tensor, impl: str = "naive") -> torch.Tensor:
    """Loss of this rank. image_embed, text_embed: [b, E] L2-normalised local rows;
    logit_scale: [1] = log(1/T), clamped at log(100).

    The mean of L_{I→T} and L_{T→I}, CLIP's convention (the survey writes their sum, which
    is twice this). Each rank scores its own rows against every rank's columns, so with
    equal local batches the mean over ranks is the loss on the concatenated global batch.

    impl: "naive" materialises this rank's [b, B] logits (below); "torch" and "triton" give
    the same loss through vlm.kernels' tiled kernel, which never does."""
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    if impl != "naive":
        return contrastive_loss(image_embed, text_embed, scale, kind="softmax", impl=impl)
    rank, _ = world()
    all_image = gather_features(image_embed)
    all_text = gather_features(text_embed)
    b = image_embed.shape[0]
    own = torch.arange(b, device=image_embed.device) + rank * b
    loss_i2t = F.cross_entropy(scale * image_embed @ all_text.T, own)
    loss_t2i = F.cross_entropy(scale * text_embed @ all_image.T, own)
    return 0.5 * (loss_i2t + loss_t2i)


def logit_scale_parameter(init_temperature: float, learn: bool) -> nn.Parameter:
    """log(1/T) as a [1] parameter: DeepSpeed cannot broadcast a 0-d parameter."""
    return nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)), requires_grad=learn)


class ClipInfoNCE(nn.Module):
    name = "clip_infonce"
    batch_coupled = True
    needs = frozenset({"image_embed", "text_embed"})
    kernels = "auto"  # RunConfig.kernels, set by build_objective

    def __init__(self, cfg: ClipInfoNCEConfig, *, embed_dim: int, vision_width: int):
        super().__init__()
        self.logit_scale = logit_scale_parameter(cfg.init_temperature, cfg.learn_temperature)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = clip_infonce(image_embed=outputs["image_embed"], text_embed=outputs["text_embed"],
                            logit_scale=self.logit_scale,
                            impl=resolve(self.kernels, outputs["image_embed"].device))
        temperature = (-self.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE)).exp()[0]
        return {self.name: loss, f"{self.name}/temperature": temperature}
