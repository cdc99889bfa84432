"""Objectives by name: OBJECTIVES (name -> nn.Module class) and build_objective.

Each objective file holds a pure, keyword-only loss function on this rank's rows (features
cross ranks only through vlm.distributed), a pydantic config with a `name` literal and a
`weight` (in vlm.objectives.configs, free of torch, re-exported by the file), and an
`nn.Module` that owns the objective's parameters (temperature, bias, heads). The module is
built as `Cls(cfg, *, embed_dim, vision_width)` and called as
`forward(outputs, batch) -> {name: loss, "name/diagnostic": detached tensor, ...}`; keys
without "/" are losses, which the trainer sums with the config weights.

Generative and alignment objectives (mim, mlm, mcm, itg, itm, region_word) have
`uses_model = True`: they are built with the model and the vocabulary size and called as
`forward(outputs, batch, model=model)`, running parts of the model themselves (a masked
encoder pass, the fusion encoder, the caption decoder)."""
from __future__ import annotations

from torch import nn

from vlm.objectives.clip_infonce import ClipInfoNCE
from vlm.objectives.itg import ITG
from vlm.objectives.itm import ITM
from vlm.objectives.mcm import MCM
from vlm.objectives.mim import MIM
from vlm.objectives.mlm import MLM
from vlm.objectives.region_word import RegionWord
from vlm.objectives.siglip import SigLIP
from vlm.objectives.slip_image import SlipImage
from vlm.objectives.unicl import UniCL

# objective name -> class, in the order of vlm.objectives.configs.OBJECTIVE_CONFIGS
OBJECTIVES: dict[str, type[nn.Module]] = {
    cls.name: cls for cls in (ClipInfoNCE, SigLIP, SlipImage, UniCL, MIM, MLM, MCM, ITG, ITM, RegionWord)}


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
