"""Masked language modelling (survey eq. 7) as in BERT.

15% of the caption's word tokens are chosen; of those 80% are replaced by a learned [MASK]
embedding, 10% by a random token and 10% left unchanged; the bidirectional text tower
predicts the chosen tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.kernels.dispatch import resolve
from vlm.models.vocab import VocabProjection
from vlm.objectives.configs import MLMConfig


def mask_tokens(tokens: torch.Tensor, eot_index: torch.Tensor, *, ratio: float, vocab_size: int,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """tokens [B, L], eot_index [B] -> {"input_ids" [B, L] (10% of the chosen replaced by a
    random id), "selected" [B, L] bool (the chosen: scored), "use_mask" [B, L] bool (80% of
    the chosen: shown as [MASK])}. Only word positions 1 .. eot-1 can be chosen (never
    <sot>, <eot> or padding). If a whole batch draws none, one word position is chosen so
    that the loss is defined (a negligible bias for real batch sizes)."""
    b, n = tokens.shape
    pos = torch.arange(n, device=tokens.device)
    maskable = (pos >= 1) & (pos < eot_index[:, None])
    u = torch.rand(b, n, generator=generator, device=tokens.device)
    selected = maskable & (u < ratio)
    if not selected.any() and maskable.any():
        flat = maskable.flatten().nonzero()[:, 0]
        pick = flat[torch.randint(len(flat), (1,), generator=generator, device=tokens.device)]
        selected = selected.flatten().index_fill(0, pick, True).view(b, n)
    kind = torch.rand(b, n, generator=generator, device=tokens.device)
    use_mask = selected & (kind < 0.8)
    use_random = selected & (kind >= 0.8) & (kind < 0.9)
    random_ids = torch.randint(vocab_size, (b, n), generator=generator, device=tokens.device)
    return {"input_ids": torch.where(use_random, random_ids, tokens), "selected": selected, "use_mask": use_mask}


def masked_token_loss(*, logits: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """logits [B, L, V], targets [B, L], selected [B, L] bool -> mean cross-entropy over the
    selected positions; the others contribute exactly nothing (value or gradient)."""
    if not selected.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[selected], targets[selected])


class TokenHead(nn.Module):
    """LayerNorm + linear to the vocabulary; small weights so that the loss starts at ln V."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.proj = VocabProjection(width, vocab_size)
        nn.init.normal_(self.proj.weight, std=0.02 * width ** -0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *, impl: str = "naive") -> torch.Tensor:
        """x [..., W] -> logits [..., V]; with targets [...]: their mean cross-entropy instead,
        fused (no logits) unless impl is naive."""
        return self.proj(self.ln(x), targets, impl=impl)


def head_loss(head: TokenHead, feats: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor,
              kernels: str) -> torch.Tensor:
    """masked_token_loss(logits=head(feats), targets, selected) without the [B, L, V] logits
    (unless kernels is naive)."""
    if not selected.any():  # nothing chosen in this micro-batch: a zero that keeps the graph
        return head(feats).sum() * 0.0
    return head(feats[selected], targets[selected], impl=resolve(kernels, feats.device))


class MLM(nn.Module):
    """Runs the text tower itself, bidirectionally (`uses_model`; a causal tower is run with
    causal=False for this objective), so it accumulates per micro-batch; not batch-coupled."""
    name = "mlm"
    batch_coupled = False
    uses_model = True
    needs = frozenset()
    kernels = "auto"  # RunConfig.kernels, set by build_objective

    def __init__(self, cfg: MLMConfig, *, embed_dim: int, vision_width: int, model: nn.Module,
                 vocab_size: int | None):
        super().__init__()
        if vocab_size is None:
            raise ValueError("objective mlm needs the vocabulary size")
        self.cfg, self.vocab_size = cfg, vocab_size
        width = model.text.pooled_dim
        self.mask_embed = nn.Parameter(0.02 * torch.randn(width))
        self.head = TokenHead(width, vocab_size)

    def forward(self, outputs: dict, batch: dict, *, model: nn.Module) -> dict[str, torch.Tensor]:
        tokens, eot = batch["tokens"], batch["eot_index"]
        m = mask_tokens(tokens, eot, ratio=self.cfg.mask_ratio, vocab_size=self.vocab_size)
        feats = model.text(m["input_ids"], eot, causal=False, masked=m["use_mask"],
                           mask_embed=self.mask_embed)["tokens"]
        return {self.name: head_loss(self.head, feats, tokens, m["selected"], self.kernels)}
