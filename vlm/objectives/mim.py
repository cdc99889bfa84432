"""Masked image modelling (survey eq. 6) as in MAE.

A random subset of patches is dropped, the encoder sees only the visible ones, a light
decoder predicts the pixels of every patch, and the loss is the mean squared error on the
masked patches only, against each patch's own normalised pixels (MAE's norm_pix_loss
target)."""
from __future__ import annotations

import torch
from torch import nn

from vlm.models.decoder import MAEDecoder
from vlm.objectives.configs import MIMConfig


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, S, S] -> [B, P, patch_size² · C], patches row-major (the ViT's order), each
    patch flattened as (row, column, channel)."""
    b, c, s, _ = images.shape
    g = s // patch_size
    x = images.reshape(b, c, g, patch_size, g, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, patch_size * patch_size * c)


def normalised_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch minus its mean over its pixels, over sqrt(variance + eps) (MAE's target)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


def random_masking(batch: int, num_patches: int, ratio: float, *, device=None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking -> (keep_index [B, K] sorted ascending, mask [B, P]
    bool, True = masked), K = round(P · (1 - ratio)), at least 1 patch kept and 1 masked."""
    keep = min(num_patches - 1, max(1, round(num_patches * (1.0 - ratio))))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    keep_index = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, keep_index, False)
    return keep_index, mask


def masked_patch_mse(*, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred, target [B, P, D]; mask [B, P] bool (True = masked, scored). The mean over
    masked patches of the per-patch mean squared error; visible patches contribute exactly
    nothing (value or gradient). Survey eq. 6 writes -log f(x̄|x̂); with a Gaussian f of
    fixed variance that is this squared error up to constants."""
    per_patch = (pred - target).pow(2).mean(dim=-1)
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)


class MIM(nn.Module):
    """Runs the image tower itself on the visible patches (`uses_model`), so under the
    gradient cache it accumulates micro-batch by micro-batch; per-sample, not batch-coupled.
    Needs a ViT image tower (the ResNet cannot drop patches)."""
    name = "mim"
    batch_coupled = False
    uses_model = True
    needs = frozenset()

    def __init__(self, cfg: MIMConfig, *, embed_dim: int, vision_width: int, model: nn.Module,
                 vocab_size: int | None = None):
        super().__init__()
        visual = model.visual
        if not hasattr(visual, "num_patches"):
            raise ValueError("objective mim needs a ViT image tower (model.vision.type: vit)")
        self.cfg = cfg
        self.patch_size = visual.patch_embed.kernel_size[0]
        self.decoder = MAEDecoder(num_patches=visual.num_patches, encoder_width=visual.pooled_dim,
                                  width=cfg.decoder_width, depth=cfg.decoder_depth, heads=cfg.decoder_heads,
                                  patch_dim=3 * self.patch_size ** 2)

    def forward(self, outputs: dict, batch: dict, *, model: nn.Module) -> dict[str, torch.Tensor]:
        images = batch["images"]
        keep_index, mask = random_masking(images.shape[0], model.visual.num_patches, self.cfg.mask_ratio,
                                          device=images.device)
        visible = model.visual(images, keep_index=keep_index)["tokens"]
        pred = self.decoder(visible, keep_index)
        target = patchify(images, self.patch_size)
        if self.cfg.norm_pix:
            target = normalised_patches(target)
        loss = masked_patch_mse(pred=pred, target=target, mask=mask)
        return {self.name: loss, f"{self.name}/mask_ratio": mask.float().mean()}
