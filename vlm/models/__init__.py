"""Pure-torch model code: no DeepSpeed, no torch.distributed (the engine wraps these)."""
from vlm.models.clip import CLIP, build_clip
from vlm.models.registry import build_model, describe, get_config, list_presets, preset_dict

__all__ = ["CLIP", "build_clip", "build_model", "describe", "get_config", "list_presets", "preset_dict"]
