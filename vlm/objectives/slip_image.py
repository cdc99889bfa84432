"""Image–image InfoNCE over two augmented views through a projection head.

Survey eq. 1, as used by SLIP; the NT-Xent form of SimCLR."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.distributed import gather_features, world
from vlm.objectives.configs import SlipImageConfig


def slip_image(*, view_embed: torch.Tensor, temperature: float) -> torch.Tensor:
    """Loss of this rank. view_embed: [2b, D] L2-normalised, laid out [view 1 of the b
    local images; view 2 of the same b images].

    Each of the 2b local rows is scored against all 2B global view embeddings except
    itself: the positive is the other view of the same image, the other 2B-2 are negatives.
    The mean over local rows; with equal local batches the mean over ranks is the loss on
    the global batch (the loss is a mean over rows, so the order of the global rows,
    rank-major here, does not matter)."""
    rank, _ = world()
    all_views = gather_features(view_embed)
    rows = view_embed.shape[0]
    b = rows // 2
    local = torch.arange(rows, device=view_embed.device)
    own = local + rank * rows
    positive = (local + b) % rows + rank * rows
    logits = view_embed @ all_views.T / temperature
    logits = logits.index_put((local, own), torch.tensor(float("-inf"), device=logits.device))
    return F.cross_entropy(logits, positive)


class SlipImage(nn.Module):
    name = "slip_image"
    batch_coupled = True
    needs = frozenset({"view_pooled"})

    def __init__(self, cfg: SlipImageConfig, *, embed_dim: int, vision_width: int):
        super().__init__()
        self.temperature = cfg.temperature
        # LayerNorm, not SLIP's BatchNorm: BatchNorm statistics are taken over each rank's
        # local batch, so a run on N ranks would compute a different loss than one process
        # on the global batch (and would need SyncBatchNorm, another cross-rank exchange).
        # LayerNorm is per sample, so the distributed loss stays exact.
        self.head = nn.Sequential(
            nn.Linear(vision_width, cfg.head_hidden),
            nn.LayerNorm(cfg.head_hidden),
            nn.ReLU(),
            nn.Linear(cfg.head_hidden, cfg.head_dim),
        )

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """outputs["view_pooled"]: [2b, W], [view 1 of all b images; view 2 of all b]."""
        view_embed = F.normalize(self.head(outputs["view_pooled"]), dim=-1)
        return {self.name: slip_image(view_embed=view_embed, temperature=self.temperature)}
