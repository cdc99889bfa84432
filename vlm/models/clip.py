"""Two-tower CLIP: a ViT image encoder, a Transformer text encoder, a learnable temperature."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm.models.text import TextTransformer
from vlm.models.vit import VisionTransformer


class CLIP(nn.Module):
    def __init__(self, vision: VisionTransformer, text: TextTransformer, init_temperature: float = 0.07):
        super().__init__()
        self.visual = vision
        self.text = text
        # Stored as log(1/T) as in CLIP; the objective clamps it so logits stay bounded.
        # Shape [1], not []: DeepSpeed's parameter broadcast cannot view a 0-d tensor as bytes.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> L2-normalised [B, E]."""
        return F.normalize(self.visual(images)["embed"], dim=-1)

    def encode_text(self, tokens: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """[B, L], [B] -> L2-normalised [B, E]."""
        return F.normalize(self.text(tokens, eot_index)["embed"], dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, eot_index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_embed": self.encode_image(images),
            "text_embed": self.encode_text(tokens, eot_index),
            "logit_scale": self.logit_scale,
        }


def build_clip(cfg, vocab_size: int) -> CLIP:
    """Builds from a `ModelConfig` slice (see vlm.config)."""
    v, t = cfg.vision, cfg.text
    vision = VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                               depth=v.depth, heads=v.heads, embed_dim=cfg.embed_dim,
                               mlp_ratio=v.mlp_ratio, grad_checkpointing=cfg.grad_checkpointing)
    text = TextTransformer(vocab_size=vocab_size, context_length=t.context_length, width=t.width,
                           depth=t.depth, heads=t.heads, embed_dim=cfg.embed_dim,
                           mlp_ratio=t.mlp_ratio, grad_checkpointing=cfg.grad_checkpointing)
    return CLIP(vision, text, cfg.init_temperature)
