"""Pure-torch model code: no DeepSpeed, no torch.distributed (the engine wraps these).

The public names below are imported lazily (PEP 562), so that `vlm.models.config` (pydantic
only, used by vlm.config and the CLI) can be imported without importing torch."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlm.models.clip import CLIP, build_clip
    from vlm.models.registry import build_model, describe, get_config, list_presets, preset_dict

_LAZY = {"CLIP": "vlm.models.clip", "build_clip": "vlm.models.clip",
         "build_model": "vlm.models.registry", "describe": "vlm.models.registry",
         "get_config": "vlm.models.registry", "list_presets": "vlm.models.registry",
         "preset_dict": "vlm.models.registry"}

__all__ = ["CLIP", "build_clip", "build_model", "describe", "get_config", "list_presets", "preset_dict"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
