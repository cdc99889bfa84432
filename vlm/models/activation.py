"""The MLP activation of the transformer towers: exact GELU (the default) or CLIP's QuickGELU.

OpenAI's CLIP weights (and OpenCLIP's `-quickgelu` models, and Hugging Face configs with
`hidden_act: quick_gelu`) were trained with x * sigmoid(1.702 x); running them with exact
GELU shifts every embedding, so an imported model keeps the activation it was trained with."""
from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = ("gelu", "quick_gelu")


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def use_activation(transformer: nn.Module, name: str) -> None:
    """Sets the MLP activation of every block of `transformer` (vlm.models.transformer),
    whose MLP is [Linear, activation, Linear, Dropout]; the activation holds no weights, so
    state dicts are the same either way."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    for block in transformer.blocks:
        block.mlp[1] = QuickGELU() if name == "quick_gelu" else nn.GELU()
