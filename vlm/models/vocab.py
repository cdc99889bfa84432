"""The projection to the vocabulary, with the loss fused in when targets are given."""
from __future__ import annotations

import torch
from torch import nn

from vlm.kernels.linear_ce import linear_cross_entropy


class VocabProjection(nn.Linear):
    """nn.Linear(width, vocab) whose call with `targets` returns the cross-entropy of the
    logits it would have produced, through vlm.kernels' fused linear cross-entropy (the
    [N, V] logits never exist) or, with impl="naive", through the logits. The loss goes
    through this module's forward so that DeepSpeed ZeRO-3 gathers the weight for it (its
    hooks fire on module calls, not on a weight read elsewhere). Same parameters, same
    state-dict keys as nn.Linear."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *, impl: str = "naive",
                label_smoothing: float = 0.0, ignore_index: int = -100) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        hidden = x.reshape(-1, x.shape[-1])
        targets = targets.reshape(-1)
        if impl == "naive":
            return nn.functional.cross_entropy(super().forward(hidden), targets, ignore_index=ignore_index,
                                               label_smoothing=label_smoothing)
        return linear_cross_entropy(hidden, self.weight, self.bias, targets, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, impl=impl)
