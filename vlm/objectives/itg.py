"""Image-to-text generation, i.e. captioning (survey eq. 9), as in CoCa.

The causal text tower's token features and the image tokens go through the model's caption decoder; each
position predicts the next token (<sot> w1 ... wn -> w1 ... wn <eot>)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.kernels.dispatch import resolve
from vlm.objectives.configs import ITGConfig


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


class ITG(nn.Module):
    """Runs the model's caption decoder (`uses_model`) on the towers' token outputs, so it
    accumulates per micro-batch; not batch-coupled. Needs model.decoder (and so a causal
    text tower: the decoder's position l must not have seen token l+1)."""
    name = "itg"
    batch_coupled = False
    uses_model = True
    needs = frozenset({"image_tokens", "text_tokens"})
    kernels = "auto"  # RunConfig.kernels, set by build_objective

    def __init__(self, cfg: ITGConfig, *, embed_dim: int, vision_width: int, model: nn.Module,
                 vocab_size: int | None = None):
        super().__init__()
        if getattr(model, "decoder", None) is None:
            raise ValueError("objective itg needs a caption decoder: set model.decoder (e.g. decoder: {})")
        if not model.text.causal:
            raise ValueError("objective itg needs a causal text tower: set model.text.causal=true")
        self.cfg = cfg
        if cfg.input_dropout > 0:
            self.drop_embed = nn.Parameter(0.02 * torch.randn(model.text.pooled_dim))

    def forward(self, outputs: dict, batch: dict, *, model: nn.Module) -> dict[str, torch.Tensor]:
        text = outputs["text_tokens"][:, :-1]
        if self.training and self.cfg.input_dropout > 0:
            drop = torch.rand(text.shape[:2], device=text.device) < self.cfg.input_dropout
            text = torch.where(drop[..., None], self.drop_embed.to(text.dtype), text)
        feats = model.decoder.features(text, outputs["image_tokens"])
        targets, valid = caption_targets(batch["tokens"], batch["eot_index"])
        # the same as caption_loss(logits=head(feats), ...), without the [B, L-1, V] logits
        # unless kernels is naive
        loss = model.decoder.head(feats[valid], targets[valid], impl=resolve(self.kernels, feats.device),
                                  label_smoothing=self.cfg.label_smoothing)
        return {self.name: loss}
