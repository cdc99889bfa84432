"""Decoders: CoCa's multimodal caption decoder and MAE's light pixel decoder."""
from __future__ import annotations

import torch
from torch import nn

from vlm.models.fusion import CrossBlock
from vlm.models.transformer import Transformer
from vlm.models.vocab import VocabProjection


class CaptionDecoder(nn.Module):
    """CoCa's multimodal text decoder: the causal text tower's token features go through
    blocks of causal self-attention and cross-attention to the image tokens, then to
    vocabulary logits. Position l only sees text positions <= l, so its logits predict
    token l + 1 (the objective shifts the targets; the loss does not live here)."""

    def __init__(self, *, vocab_size: int, width: int, image_width: int, depth: int, heads: int,
                 mlp_ratio: float = 2.0, context_length: int = 77):
        super().__init__()
        self.blocks = nn.ModuleList(CrossBlock(width, image_width, heads, mlp_ratio, depth) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        self.head = VocabProjection(width, vocab_size)
        # small logits at initialisation: the caption loss starts at ln(vocab_size)
        nn.init.normal_(self.head.weight, std=0.02 * width ** -0.5)
        nn.init.zeros_(self.head.bias)
        mask = torch.ones(context_length, context_length, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """text_tokens [B, L, W] (causal text tower output), image_tokens [B, P, Wi] -> logits [B, L, V]."""
        return self.head(self.features(text_tokens, image_tokens))

    def features(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """The final normalised features [B, L, W] that `head` projects to the vocabulary
        (the caption loss calls head(features, targets) and never builds the logits)."""
        n = text_tokens.shape[1]
        if n > self.causal_mask.shape[0]:
            raise ValueError(f"{n} tokens exceed the decoder's context length {self.causal_mask.shape[0]}")
        x = text_tokens
        for block in self.blocks:
            x = block(x, image_tokens, self.causal_mask[:n, :n])
        return self.ln_final(x)


class MAEDecoder(nn.Module):
    """MAE's light decoder: the encoder's visible-patch tokens, projected to a narrow width,
    are put back at their positions among learned mask tokens; a few blocks of
    self-attention over all P positions predict each patch's pixels."""

    def __init__(self, *, num_patches: int, encoder_width: int, width: int, depth: int, heads: int,
                 patch_dim: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.num_patches = num_patches
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(num_patches, width))
        self.blocks = Transformer(width, depth, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_dim)

    def forward(self, visible: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """visible [B, K, We] in keep_index order, keep_index [B, K] -> predictions [B, P, patch_dim]
        for every patch in row-major order (the loss reads only the masked ones)."""
        b, k = keep_index.shape
        x = self.mask_token.expand(b, self.num_patches, -1).clone()
        x = x.scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), self.embed(visible))
        x = self.blocks(x + self.pos_embed)
        return self.head(self.ln_final(x))
