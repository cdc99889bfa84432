"""Multimodal (fusion) encoders over image and text tokens, and their cross-attention block.

The encoders serve the objectives that score or reconstruct a pair jointly (image–text
matching, masked cross-modal modelling); CoCa's caption decoder shares the cross-attention
block with the "cross" variant."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.models.transformer import Attention, Transformer


def text_valid(eot_index: torch.Tensor, length: int) -> torch.Tensor:
    """[B] end-of-text positions -> [B, L] bool, True up to and including <eot> (not padding)."""
    return torch.arange(length, device=eot_index.device) <= eot_index[:, None]


class CrossAttention(nn.Module):
    """Queries from x [B, N, W], keys and values from context [B, M, C]."""

    def __init__(self, width: int, context_width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        m = context.shape[1]
        q = self.q(x).view(b, n, self.heads, w // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(b, m, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class CrossBlock(nn.Module):
    """Pre-norm self-attention (under `attn_mask`), cross-attention to `context`, MLP."""

    def __init__(self, width: int, context_width: int, heads: int, mlp_ratio: float = 4.0, depth: int = 1):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_cross = nn.LayerNorm(width)
        self.ln_context = nn.LayerNorm(context_width)
        self.cross = CrossAttention(width, context_width, heads)
        self.ln2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        # as Transformer.reset_parameters: writes into the residual stream shrink with depth
        std, residual_std = width ** -0.5, width ** -0.5 * (3 * depth) ** -0.5
        with torch.no_grad():
            for linear in (self.attn.qkv, self.cross.q, self.cross.kv, self.mlp[0]):
                nn.init.normal_(linear.weight, std=std)
            for linear in (self.attn.proj, self.cross.proj, self.mlp[2]):
                nn.init.normal_(linear.weight, std=residual_std)
            for linear in (self.attn.qkv, self.attn.proj, self.cross.q, self.cross.kv, self.cross.proj,
                           self.mlp[0], self.mlp[2]):
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attn_mask)
        x = x + self.cross(self.ln_cross(x), self.ln_context(context))
        return x + self.mlp(self.ln2(x))


class FusionEncoder(nn.Module):
    """Joint encoder of one image and one text per row.

    "concat" (FLAVA): [cls; image tokens; text tokens], each projected to `width` and tagged
    with a modality embedding, through bidirectional self-attention; text padding is hidden.
    "cross" (ALBEF/BLIP): [cls; text tokens] attend to themselves and cross-attend to the
    image tokens in every block; the image tokens are only projected (they are context)."""

    def __init__(self, *, type: str, image_width: int, text_width: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 2.0):
        super().__init__()
        if type not in ("concat", "cross"):
            raise ValueError(f"unknown fusion type {type!r}: 'concat' or 'cross'")
        self.type = type
        self.width = width
        self.image_in = nn.Linear(image_width, width)
        self.text_in = nn.Linear(text_width, width)
        self.cls = nn.Parameter(width ** -0.5 * torch.randn(1, width))
        self.modality = nn.Parameter(0.02 * torch.randn(2, width))  # [image, text]
        if type == "concat":
            self.blocks = Transformer(width, depth, heads, mlp_ratio)
        else:
            self.blocks = nn.ModuleList(CrossBlock(width, width, heads, mlp_ratio, depth) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                eot_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """image_tokens [B, P, Wi], text_tokens [B, L, Wt], eot_index [B] ->
        "cls" [B, width] (the pair's joint feature), "image" [B, P, width], "text" [B, L, width]."""
        b, p = image_tokens.shape[:2]
        n = text_tokens.shape[1]
        image = self.image_in(image_tokens) + self.modality[0]
        text = self.text_in(text_tokens) + self.modality[1]
        cls = self.cls.expand(b, 1, -1)
        keep_text = text_valid(eot_index, n)
        if self.type == "concat":
            keep = torch.cat([keep_text.new_ones(b, 1 + p), keep_text], dim=1)  # [B, 1+P+L]
            x = self.ln_final(self.blocks(torch.cat([cls, image, text], dim=1), keep[:, None, None, :]))
            return {"cls": x[:, 0], "image": x[:, 1:1 + p], "text": x[:, 1 + p:]}
        keep = torch.cat([keep_text.new_ones(b, 1), keep_text], dim=1)[:, None, None, :]
        x = torch.cat([cls, text], dim=1)
        for block in self.blocks:
            x = block(x, image, keep)
        x = self.ln_final(x)
        return {"cls": x[:, 0], "image": image, "text": x[:, 1:]}
