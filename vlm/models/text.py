"""Transformer text encoder as in CLIP.

Causal mask, features pooled at the end-of-text token; `causal=False` gives a bidirectional
encoder (for masked language modelling)."""
from __future__ import annotations

import torch
from torch import nn

from vlm.models.activation import use_activation
from vlm.models.transformer import Transformer


class TextTransformer(nn.Module):
    def __init__(self, *, vocab_size: int, context_length: int, width: int, depth: int,
                 heads: int, embed_dim: int, mlp_ratio: float = 4.0, causal: bool = True,
                 grad_checkpointing: bool = False, dropout: float = 0.0, drop_path: float = 0.0, activation: str = "gelu"):
        super().__init__()
        self.context_length = context_length
        self.causal = causal
        self.pooled_dim = width
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(0.01 * torch.randn(context_length, width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio, grad_checkpointing, dropout, drop_path)
        use_activation(self.transformer, activation)
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)
        mask = torch.ones(context_length, context_length, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor, eot_index: torch.Tensor, *, causal: bool | None = None,
                masked: torch.Tensor | None = None, mask_embed: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """tokens: [B, L] ids (L <= context_length); eot_index: [B] end-of-text positions;
        causal: override the tower's own mask for this call (False: the bidirectional path of
        masked language modelling; padding after <eot> is then hidden from every position);
        masked: optional [B, L] bool, positions whose token embedding is replaced by
        `mask_embed` ([W], the caller's learned [MASK]: the BPE vocabulary has none).

        Returns (unnormalised):
          "embed":  [B, E] projected feature at the end-of-text position (under the causal
                    mask the only position that has seen the whole caption);
          "pooled": [B, W] the same feature before the projection;
          "tokens": [B, L, W] every position after ln_final."""
        n = tokens.shape[1]
        if n > self.context_length:
            raise ValueError(f"{n} tokens exceed the context length {self.context_length}")
        x = self.token_embed(tokens)
        if masked is not None:
            if mask_embed is None:
                raise ValueError("masked needs mask_embed, the embedding that replaces masked tokens")
            x = torch.where(masked.unsqueeze(-1), mask_embed.to(x.dtype), x)
        x = x + self.pos_embed[:n]
        causal = self.causal if causal is None else causal
        if causal:
            mask = self.causal_mask[:n, :n]
        elif causal is not self.causal:
            # a causal tower run bidirectionally: padding was never seen by its positions,
            # so keep it out of their attention ([B, 1, 1, L], True = attend)
            mask = (torch.arange(n, device=x.device) <= eot_index[:, None])[:, None, None, :]
        else:
            mask = None
        x = self.transformer(x, mask)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return {"embed": self.proj(pooled), "pooled": pooled, "tokens": x}
