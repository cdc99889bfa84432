"""Pure-torch model code: no DeepSpeed, no torch.distributed (the engine wraps these)."""
from vlm.models.clip import CLIP, build_clip

__all__ = ["CLIP", "build_clip"]
