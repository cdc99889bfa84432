"""Objectives by name. Each is a keyword-only function of model outputs returning a dict of
named losses; the trainer sums them with the weights from the config."""
from vlm.objectives.clip_infonce import clip_infonce

OBJECTIVES = {"clip_infonce": clip_infonce}

__all__ = ["OBJECTIVES", "clip_infonce"]
