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
encoder pass, the fusion encoder, the caption decoder).

The configs live in vlm.objectives.configs, free of torch, and are imported here eagerly;
the objective modules (torch) are imported on first use (PEP 562), so vlm.config and the
CLI can validate configs without importing torch."""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from vlm.objectives.configs import (OBJECTIVE_CONFIGS, AnyObjectiveConfig, ClipInfoNCEConfig, ITGConfig,
                                    ITMConfig, MCMConfig, MIMConfig, MLMConfig, RegionWordConfig, SigLIPConfig,
                                    SlipImageConfig, UniCLConfig)

if TYPE_CHECKING:
    from torch import nn

    from vlm.objectives.clip_infonce import ClipInfoNCE, clip_infonce
    from vlm.objectives.itg import ITG, caption_loss
    from vlm.objectives.itm import ITM, itm_loss
    from vlm.objectives.mcm import MCM
    from vlm.objectives.mim import MIM, masked_patch_mse
    from vlm.objectives.mlm import MLM, masked_token_loss
    from vlm.objectives.region_word import RegionWord, focal_loss
    from vlm.objectives.siglip import SigLIP, siglip
    from vlm.objectives.slip_image import SlipImage, slip_image
    from vlm.objectives.unicl import UniCL, unicl

    OBJECTIVES: dict[str, type[nn.Module]]

# torch-backed names, resolved on first access: name -> module under vlm.objectives
_LAZY = {"ClipInfoNCE": "clip_infonce", "clip_infonce": "clip_infonce",
         "SigLIP": "siglip", "siglip": "siglip",
         "SlipImage": "slip_image", "slip_image": "slip_image",
         "UniCL": "unicl", "unicl": "unicl",
         "MIM": "mim", "masked_patch_mse": "mim",
         "MLM": "mlm", "masked_token_loss": "mlm",
         "MCM": "mcm",
         "ITG": "itg", "caption_loss": "itg",
         "ITM": "itm", "itm_loss": "itm",
         "RegionWord": "region_word", "focal_loss": "region_word"}
# registry order = OBJECTIVE_CONFIGS order
_OBJECTIVE_CLASSES = ("ClipInfoNCE", "SigLIP", "SlipImage", "UniCL", "MIM", "MLM", "MCM", "ITG", "ITM", "RegionWord")


def __getattr__(name: str):
    if name == "OBJECTIVES":
        # dict[str, type[nn.Module]]: objective name -> class
        value = {cls.name: cls for cls in (__getattr__(c) for c in _OBJECTIVE_CLASSES)}
    elif name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing a submodule binds it as an attribute of this package. Four submodules are
    named like their loss function (clip_infonce, siglip, slip_image, unicl); for those the
    package attribute stays the function, as when this package imported them eagerly."""

    def __setattr__(self, name: str, value) -> None:
        if (name in _LAZY and isinstance(value, types.ModuleType)
                and value.__name__ == f"{self.__name__}.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def build_objective(cfg, *, embed_dim: int, vision_width: int, model: nn.Module | None = None,
                    vocab_size: int | None = None, kernels: str = "auto") -> nn.Module:
    """cfg: one of OBJECTIVE_CONFIGS; embed_dim: E of the embeddings; vision_width: W of the
    image tower's pooled feature (the input of heads such as slip_image's). Objectives with
    `uses_model = True` also receive the model (to size their heads and decoders from its
    towers) and the text vocabulary size. kernels: RunConfig.kernels, for the objectives
    with a memory-heavy loss (a `kernels` attribute: the contrastive ones, captioning and
    the token heads), see vlm/kernels."""
    objectives = globals()["OBJECTIVES"] if "OBJECTIVES" in globals() else __getattr__("OBJECTIVES")
    if cfg.name not in objectives:
        raise ValueError(f"unknown objective {cfg.name!r}; registered: {', '.join(sorted(objectives))}")
    cls = objectives[cfg.name]
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
