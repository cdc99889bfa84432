"""CLIP-style Vision Transformer (survey 2.1.1): patch embedding, class token, a norm
before the transformer, attention through scaled_dot_product_attention."""
from __future__ import annotations

import torch
from torch import nn

from vlm.models.transformer import Transformer


class VisionTransformer(nn.Module):
    def __init__(self, *, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 embed_dim: int, mlp_ratio: float = 4.0, grad_checkpointing: bool = False):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.cls_token = nn.Parameter(scale * torch.randn(width))
        self.pos_embed = nn.Parameter(scale * torch.randn(self.num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio, grad_checkpointing)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: [B, 3, H, W] -> {"embed": [B, E], "tokens": [B, P, W]} (unnormalised)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, P, W]
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x)
        return {"embed": self.proj(x[:, 0]), "tokens": x[:, 1:]}
