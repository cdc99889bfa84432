"""Two-tower CLIP: an image tower (ViT or modified ResNet) and a Transformer text tower.

The temperature and any other loss parameters belong to the objectives, not to the model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CLIP(nn.Module):
    """`fusion` (a FusionEncoder) and `decoder` (a CaptionDecoder) are optional parts that
    the fusion and captioning objectives run through `uses_model`; they belong to the model
    (not to one objective) because several objectives share the fusion encoder and because
    `vlm caption` needs the decoder at inference."""

    def __init__(self, vision: nn.Module, text: nn.Module, fusion: nn.Module | None = None,
                 decoder: nn.Module | None = None):
        super().__init__()
        self.visual = vision
        self.text = text
        self.fusion = fusion
        self.decoder = decoder

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> L2-normalised [B, E]."""
        return F.normalize(self.visual(images)["embed"], dim=-1)

    def encode_text(self, tokens: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """[B, L], [B] -> L2-normalised [B, E]."""
        return F.normalize(self.text(tokens, eot_index)["embed"], dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, eot_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns "image_embed" and "text_embed" (L2-normalised [B, E]), "image_pooled"
        ([B, visual.pooled_dim], the image tower's feature before its projection, for an
        image-image objective's own head), and the towers' token features "image_tokens"
        [B, P, Wi] and "text_tokens" [B, L, Wt] (what fusion, captioning and region
        objectives read, so they need not run the towers again)."""
        image = self.visual(images)
        text = self.text(tokens, eot_index)
        return {
            "image_embed": F.normalize(image["embed"], dim=-1),
            "text_embed": F.normalize(text["embed"], dim=-1),
            "image_pooled": image["pooled"],
            "image_tokens": image["tokens"],
            "text_tokens": text["tokens"],
        }

