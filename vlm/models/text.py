"""Transformer text encoder as in CLIP: causal mask, features pooled at the end-of-text token."""
from __future__ import annotations

import torch
from torch import nn

from vlm.models.transformer import Transformer


class TextTransformer(nn.Module):
    def __init__(self, *, vocab_size: int, context_length: int, width: int, depth: int,
                 heads: int, embed_dim: int, mlp_ratio: float = 4.0,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(0.01 * torch.randn(context_length, width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio, grad_checkpointing)
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        causal = torch.ones(context_length, context_length, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, tokens: torch.Tensor, eot_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens: [B, L] ids; eot_index: [B] position of each end-of-text token.

        Returns {"embed": [B, E]} taken at the end-of-text position (which, under the
        causal mask, has seen the whole caption)."""
        n = tokens.shape[1]
        x = self.token_embed(tokens) + self.pos_embed[:n]
        x = self.transformer(x, self.causal_mask[:n, :n])
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return {"embed": self.proj(pooled)}
