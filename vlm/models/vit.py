"""CLIP-style Vision Transformer (survey 2.1.1).

Patch embedding, class token, a norm before the transformer, attention through scaled_dot_product_attention."""
from __future__ import annotations

import torch
from torch import nn

from vlm.models.activation import use_activation
from vlm.models.transformer import Transformer


class VisionTransformer(nn.Module):
    def __init__(self, *, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 embed_dim: int, mlp_ratio: float = 4.0, grad_checkpointing: bool = False,
                 dropout: float = 0.0, drop_path: float = 0.0, activation: str = "gelu"):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.num_patches = (image_size // patch_size) ** 2
        self.pooled_dim = width
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.cls_token = nn.Parameter(scale * torch.randn(width))
        self.pos_embed = nn.Parameter(scale * torch.randn(self.num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio, grad_checkpointing, dropout, drop_path)
        use_activation(self.transformer, activation)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=scale)

    def forward(self, images: torch.Tensor, keep_index: torch.Tensor | None = None, *,
                patch_mask: torch.Tensor | None = None,
                mask_embed: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images: [B, 3, S, S]; keep_index: optional [B, K] patch indices (row-major, < P) to keep;
        patch_mask: optional [B, P] bool, True where the patch's embedding is replaced by
        `mask_embed` ([W], the caller's learned mask token) before the positional embedding
        (BEiT/FLAVA masking: the masked patches stay in the sequence but show no pixels).

        Returns (unnormalised):
          "embed":  [B, E] projected class token;
          "pooled": [B, W] class token after ln_post, before the projection;
          "tokens": [B, P, W] patch tokens after ln_post, or [B, K, W] in keep_index order.
        Dropped patches never enter the transformer (MAE); each kept patch carries the
        positional embedding of its original position."""
        # the loader normalises in float32; the weights may be bf16 (DeepSpeed's precision)
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # [B, P, W]
        if patch_mask is not None:
            if mask_embed is None:
                raise ValueError("patch_mask needs mask_embed, the embedding that replaces masked patches")
            x = torch.where(patch_mask.unsqueeze(-1), mask_embed.to(x.dtype), x)
        x = x + self.pos_embed[1:]
        if keep_index is not None:
            index = keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x = torch.gather(x, 1, index)  # [B, K, W]
        cls = (self.cls_token + self.pos_embed[0]).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        pooled = x[:, 0]
        return {"embed": self.proj(pooled), "pooled": pooled, "tokens": x[:, 1:]}
