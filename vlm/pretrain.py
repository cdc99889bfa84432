"""The model and its objectives as one module, the unit DeepSpeed wraps.

Objectives own their parameters (temperatures, biases, heads), so they live beside the
model rather than inside it; the weighted sum of their losses is the training loss."""
from __future__ import annotations

import torch
from torch import nn

from vlm.models import CLIP

MODEL_PREFIX = "model."


class Pretrainer(nn.Module):
    def __init__(self, model: CLIP, objectives: list[nn.Module], weights: list[float]):
        super().__init__()
        if len(objectives) != len(weights) or not objectives:
            raise ValueError("need one weight per objective, and at least one objective")
        self.model = model
        self.objectives = nn.ModuleList(objectives)
        self.weights = list(weights)
        self.needs = frozenset().union(*(o.needs for o in objectives))

    @property
    def needs_views(self) -> bool:
        return "view_pooled" in self.needs

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: images [b,3,S,S], tokens [b,L], eot_index [b], labels [b], views [2b,3,S,S]
        (the last two when an objective needs them) -> {"loss": weighted total, each
        objective's named losses, diagnostics named "objective/what" (detached)}."""
        out = self.model(batch["images"], batch["tokens"], batch["eot_index"])
        if self.needs_views:
            out["view_pooled"] = self.model.visual(batch["views"])["pooled"]
        result: dict[str, torch.Tensor] = {}
        total = None
        for objective, weight in zip(self.objectives, self.weights):
            for key, value in objective(out, batch).items():
                if "/" in key:
                    result[key] = value.detach()
                    continue
                result[key] = value
                total = weight * value if total is None else total + weight * value
        result["loss"] = total
        return result


def model_state_from_pretrainer(state: dict) -> dict:
    """A Pretrainer state dict -> the CLIP model's own (what evaluation loads)."""
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
