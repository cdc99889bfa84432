"""Region–word matching (survey eq. 11), GLIP-style.

Region features are pooled from the image tower's patch tokens by RoI-align over each box,
phrase features come from the text tower, the alignment logits are their (scaled) dot
products, and a binary focal loss scores every region against every distinct phrase of the
micro-batch, positive where the region's own phrase is that phrase."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm.models.roi import roi_align
from vlm.objectives.configs import RegionWordConfig


def focal_loss(*, logits: torch.Tensor, labels: torch.Tensor, alpha: float | None, gamma: float) -> torch.Tensor:
    """logits, labels [N, Q] (labels in {0, 1}) -> Σ -α_t (1 - p_t)^γ log p_t / max(1, #positives),
    p_t = σ(s) for a positive pair and 1 - σ(s) for a negative one, α_t = α or 1 - α (no
    weighting when alpha is None). gamma = 0 and alpha None is the binary cross-entropy of
    eq. 11, summed over pairs. Normalised by the positives as in RetinaNet and GLIP, so the
    many easy negatives of a large batch do not shrink the loss."""
    labels = labels.to(logits.dtype)
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    log_pt = labels * log_p + (1 - labels) * log_not_p
    loss = -log_pt * (1 - log_pt.exp()).pow(gamma)
    if alpha is not None:
        loss = loss * (labels * alpha + (1 - labels) * (1 - alpha))
    return loss.sum() / labels.sum().clamp(min=1.0)


def feature_map(image_tokens: torch.Tensor) -> torch.Tensor:
    """[B, P, W] patch tokens of a square grid -> [B, W, g, g]."""
    b, p, w = image_tokens.shape
    g = math.isqrt(p)
    if g * g != p:
        raise ValueError(f"{p} image tokens do not form a square grid")
    return image_tokens.transpose(1, 2).reshape(b, w, g, g)


class RegionWord(nn.Module):
    """`uses_model` (runs the text tower on the phrases) and per micro-batch: regions and
    phrases are matched within the local batch, not across ranks (not batch-coupled).
    Reads the batch fields that BatchLoader makes for need "regions": boxes [B, R, 4]
    (fractions of the image side), box_valid [B, R], phrase_ids [B, R], phrase_tokens
    [B, R, L], phrase_eot [B, R]."""
    name = "region_word"
    batch_coupled = False
    uses_model = True
    needs = frozenset({"image_tokens", "regions"})

    def __init__(self, cfg: RegionWordConfig, *, embed_dim: int, vision_width: int, model: nn.Module,
                 vocab_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.region_proj = nn.Linear(vision_width, embed_dim, bias=False)
        nn.init.normal_(self.region_proj.weight, std=vision_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(cfg.init_scale)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_bias)))

    def region_embed(self, image_tokens: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """[B, P, W], boxes [N, 4], batch_index [N] -> L2-normalised region embeddings [N, E]."""
        pooled = roi_align(feature_map(image_tokens), boxes, batch_index, output_size=self.cfg.output_size,
                           sampling_ratio=self.cfg.sampling_ratio).mean(dim=(2, 3))
        return F.normalize(self.region_proj(pooled), dim=-1)

    def alignment_logits(self, region_embed: torch.Tensor, phrase_embed: torch.Tensor) -> torch.Tensor:
        """[N, E], [Q, E] (normalised) -> [N, Q] = t · r·w + b."""
        return self.logit_scale.exp() * region_embed @ phrase_embed.T + self.logit_bias

    def forward(self, outputs: dict, batch: dict, *, model: nn.Module) -> dict[str, torch.Tensor]:
        valid = batch["box_valid"]
        bi, ri = valid.nonzero(as_tuple=True)
        if len(bi) == 0:  # no boxes in this micro-batch: a zero that keeps every parameter in the graph
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return {self.name: zero}
        regions = self.region_embed(outputs["image_tokens"], batch["boxes"][bi, ri], bi)
        phrase_ids = batch["phrase_ids"][bi, ri]
        unique, inverse = phrase_ids.unique(return_inverse=True)
        n = len(bi)
        first = torch.full((len(unique),), n, device=bi.device).scatter_reduce(
            0, inverse, torch.arange(n, device=bi.device), "amin")
        phrases = model.text(batch["phrase_tokens"][bi, ri][first], batch["phrase_eot"][bi, ri][first])["embed"]
        logits = self.alignment_logits(regions, F.normalize(phrases, dim=-1))
        labels = (inverse[:, None] == torch.arange(len(unique), device=bi.device)[None, :]).float()
        loss = focal_loss(logits=logits, labels=labels, alpha=self.cfg.focal_alpha, gamma=self.cfg.focal_gamma)
        accuracy = (logits.argmax(dim=1) == inverse).float().mean()
        return {self.name: loss, f"{self.name}/accuracy": accuracy, f"{self.name}/phrases": torch.tensor(
            float(len(unique)))}
