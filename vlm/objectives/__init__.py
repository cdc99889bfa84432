"""Objectives by name, one file each.

Each file holds a pure, keyword-only loss function on this rank's rows (features cross
ranks only through vlm.distributed), a pydantic config with a `name` literal and a
`weight`, and an `nn.Module` that owns the objective's parameters (temperature, bias,
heads). The module is built as `Cls(cfg, *, embed_dim, vision_width)` and called as
`forward(outputs, batch) -> {name: loss, "name/diagnostic": detached tensor, ...}`; keys
without "/" are losses, which the trainer sums with the config weights.

Generative and alignment objectives (mim, mlm, mcm, itg, itm, region_word) have
`uses_model = True`: they are built with the model and the vocabulary size and called as
`forward(outputs, batch, model=model)`, running parts of the model themselves (a masked
encoder pass, the fusion encoder, the caption decoder)."""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field
from torch import nn

from vlm.objectives.clip_infonce import ClipInfoNCE, ClipInfoNCEConfig, clip_infonce
from vlm.objectives.itg import ITG, ITGConfig, caption_loss
from vlm.objectives.itm import ITM, ITMConfig, itm_loss
from vlm.objectives.mcm import MCM, MCMConfig
from vlm.objectives.mim import MIM, MIMConfig, masked_patch_mse
from vlm.objectives.mlm import MLM, MLMConfig, masked_token_loss
from vlm.objectives.region_word import RegionWord, RegionWordConfig, focal_loss
from vlm.objectives.siglip import SigLIP, SigLIPConfig, siglip
from vlm.objectives.slip_image import SlipImage, SlipImageConfig, slip_image
from vlm.objectives.unicl import UniCL, UniCLConfig, unicl

OBJECTIVES: dict[str, type[nn.Module]] = {cls.name: cls for cls in (ClipInfoNCE, SigLIP, SlipImage, UniCL,
                                                                     MIM, MLM, MCM, ITG, ITM, RegionWord)}
OBJECTIVE_CONFIGS = (ClipInfoNCEConfig, SigLIPConfig, SlipImageConfig, UniCLConfig,
                     MIMConfig, MLMConfig, MCMConfig, ITGConfig, ITMConfig, RegionWordConfig)
# one objective's config, told apart by `name`
AnyObjectiveConfig = Annotated[Union[OBJECTIVE_CONFIGS], Field(discriminator="name")]


def build_objective(cfg, *, embed_dim: int, vision_width: int, model: nn.Module | None = None,
                    vocab_size: int | None = None, kernels: str = "auto") -> nn.Module:
    """cfg: one of OBJECTIVE_CONFIGS; embed_dim: E of the embeddings; vision_width: W of the
    image tower's pooled feature (the input of heads such as slip_image's). Objectives with
    `uses_model = True` also receive the model (to size their heads and decoders from its
    towers) and the text vocabulary size. kernels: RunConfig.kernels, for the objectives
    with a memory-heavy loss (a `kernels` attribute: the contrastive ones, captioning and
    the token heads), see vlm/kernels."""
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.name!r}; registered: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[cfg.name]
    extra = {"model": model, "vocab_size": vocab_size} if getattr(cls, "uses_model", False) else {}
    objective = cls(cfg, embed_dim=embed_dim, vision_width=vision_width, **extra)
    if hasattr(objective, "kernels"):
        objective.kernels = kernels
    return objective


__all__ = ["OBJECTIVES", "OBJECTIVE_CONFIGS", "AnyObjectiveConfig", "build_objective",
           "ClipInfoNCE", "ClipInfoNCEConfig", "clip_infonce", "SigLIP", "SigLIPConfig", "siglip",
           "SlipImage", "SlipImageConfig", "slip_image", "UniCL", "UniCLConfig", "unicl",
           "MIM", "MIMConfig", "masked_patch_mse", "MLM", "MLMConfig", "masked_token_loss", "MCM", "MCMConfig",
           "ITG", "ITGConfig", "caption_loss", "ITM", "ITMConfig", "itm_loss", "RegionWord", "RegionWordConfig",
           "focal_loss"]
