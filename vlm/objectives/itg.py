"""Image-to-text generation, i.e. captioning (survey eq. 9), as in CoCa: the causal text
tower's token features and the image tokens go through the model's caption decoder; each
position predicts the next token (<sot> w1 ... wn -> w1 ... wn <eot>)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


def caption_targets(tokens: torch.Tensor, eot_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, L], eot_index [B] -> (targets [B, L-1] = tokens shifted left by one,
    valid [B, L-1] bool: the target is a word or <eot>, not padding)."""
    targets = tokens[:, 1:]
    valid = torch.arange(1, tokens.shape[1], device=tokens.device) <= eot_index[:, None]
    return targets, valid


def caption_loss(*, logits: torch.Tensor, tokens: torch.Tensor, eot_index: torch.Tensor,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """logits [B, L-1, V] (position l predicts token l+1), tokens [B, L], eot_index [B] ->
    the mean over every non-padding target token of the batch of the (label-smoothed)
    cross-entropy. Survey eq. 9 sums over a caption's tokens; the mean over tokens keeps the
    scale independent of caption length (ln V at initialisation). Padding targets contribute
    exactly nothing."""
    targets, valid = caption_targets(tokens, eot_index)
    return F.cross_entropy(logits[valid], targets[valid], label_smoothing=label_smoothing)


class ITGConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: Literal["itg"] = "itg"
    weight: float = Field(1.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class ITG(nn.Module):
    """Runs the model's caption decoder (`uses_model`) on the towers' token outputs, so it
    accumulates per micro-batch; not batch-coupled. Needs model.decoder (and so a causal
    text tower: the decoder's position l must not have seen token l+1)."""
    name = "itg"
    batch_coupled = False
    uses_model = True
    needs = frozenset({"image_tokens", "text_tokens"})

    def __init__(self, cfg: ITGConfig, *, embed_dim: int, vision_width: int, model: nn.Module,
                 vocab_size: int | None = None):
        super().__init__()
        if getattr(model, "decoder", None) is None:
            raise ValueError("objective itg needs a caption decoder: set model.decoder (e.g. decoder: {})")
        if not model.text.causal:
            raise ValueError("objective itg needs a causal text tower: set model.text.causal=true")
        self.cfg = cfg

    def forward(self, outputs: dict, batch: dict, *, model: nn.Module) -> dict[str, torch.Tensor]:
        logits = model.decoder(outputs["text_tokens"][:, :-1], outputs["image_tokens"])
        loss = caption_loss(logits=logits, tokens=batch["tokens"], eot_index=batch["eot_index"],
                            label_smoothing=self.cfg.label_smoothing)
        return {self.name: loss}
