"""Masked cross-modal modelling (survey eq. 8) as in FLAVA.

About 40% of the image patches (in blocks, BEiT-style) and 15% of the caption's tokens are masked in the same matched
pair; the multimodal encoder reconstructs both, each conditioned on the visible part of the
image and of the text. Image target: each masked patch's normalised pixels (FLAVA predicts
dVAE codes; this project has no image tokenizer); text target: the masked tokens."""
from __future__ import annotations

import math

import torch
from torch import nn

from vlm.objectives.configs import MCMConfig
from vlm.objectives.mim import masked_patch_mse, normalised_patches, patchify
from vlm.objectives.mlm import TokenHead, head_loss, mask_tokens


MAX_BLOCK_TRIES = 100  # per image, then random patches top the mask up


def block_mask(batch: int, grid: int, ratio: float, *, min_block: int = 4,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """BEiT's blockwise masking -> [B, grid²] bool (True = masked, row-major patches).

    Rectangles of at least `min_block` patches and aspect ratio in [0.3, 1/0.3] (log-uniform)
    are added until round(ratio · grid²) patches are masked; a block never overshoots the
    target by more than its rounding, and if the tries run out random patches make up the rest."""
    target = max(1, round(ratio * grid * grid))
    masks = torch.zeros(batch, grid, grid, dtype=torch.bool)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    for m in masks:
        for _ in range(MAX_BLOCK_TRIES):
            count = int(m.sum())
            if count >= target:
                break
            area = uniform(min(min_block, target - count), target - count)
            aspect = math.exp(uniform(*log_aspect))
            h = max(1, min(grid, round(math.sqrt(area * aspect))))
            w = max(1, min(grid, round(math.sqrt(area / aspect))))
            top = int(torch.randint(grid - h + 1, (), generator=generator))
            left = int(torch.randint(grid - w + 1, (), generator=generator))
            m[top:top + h, left:left + w] = True
        flat = m.view(-1)
        missing = target - int(flat.sum())
        if missing > 0:
            free = (~flat).nonzero()[:, 0]
            flat[free[torch.randperm(len(free), generator=generator)[:missing]]] = True
    return masks.view(batch, grid * grid)


class MCM(nn.Module):
    """Runs both towers (masked) and the model's fusion encoder itself (`uses_model`), so it
    accumulates per micro-batch; not batch-coupled. Needs a ViT and model.fusion. Scores the
    batch's own (matched) pairs only, never the negatives that ITM builds."""
    name = "mcm"
    batch_coupled = False
    uses_model = True
    needs = frozenset()
    kernels = "auto"  # RunConfig.kernels, set by build_objective

    def __init__(self, cfg: MCMConfig, *, embed_dim: int, vision_width: int, model: nn.Module,
                 vocab_size: int | None):
        super().__init__()
        if getattr(model, "fusion", None) is None:
            raise ValueError("objective mcm needs a multimodal encoder: set model.fusion (e.g. fusion: {})")
        if not hasattr(model.visual, "num_patches"):
            raise ValueError("objective mcm needs a ViT image tower (model.vision.type: vit)")
        if vocab_size is None:
            raise ValueError("objective mcm needs the vocabulary size")
        self.cfg, self.vocab_size = cfg, vocab_size
        self.patch_size = model.visual.patch_embed.kernel_size[0]
        self.grid = model.visual.image_size // self.patch_size
        width = model.fusion.width
        self.image_mask_embed = nn.Parameter(0.02 * torch.randn(model.visual.pooled_dim))
        self.text_mask_embed = nn.Parameter(0.02 * torch.randn(model.text.pooled_dim))
        self.pixel_head = nn.Linear(width, 3 * self.patch_size ** 2)
        self.token_head = TokenHead(width, vocab_size)

    def forward(self, outputs: dict, batch: dict, *, model: nn.Module) -> dict[str, torch.Tensor]:
        images, tokens, eot = batch["images"], batch["tokens"], batch["eot_index"]
        patch_mask = block_mask(images.shape[0], self.grid, self.cfg.image_mask_ratio).to(images.device)
        m = mask_tokens(tokens, eot, ratio=self.cfg.text_mask_ratio, vocab_size=self.vocab_size)
        image = model.visual(images, patch_mask=patch_mask, mask_embed=self.image_mask_embed)["tokens"]
        text = model.text(m["input_ids"], eot, causal=False, masked=m["use_mask"],
                          mask_embed=self.text_mask_embed)["tokens"]
        fused = model.fusion(image, text, eot)
        loss_image = masked_patch_mse(pred=self.pixel_head(fused["image"]),
                                      target=normalised_patches(patchify(images, self.patch_size)), mask=patch_mask)
        loss_text = head_loss(self.token_head, fused["text"], tokens, m["selected"], self.kernels)
        return {self.name: loss_image + loss_text, f"{self.name}/image": loss_image.detach(),
                f"{self.name}/text": loss_text.detach(), f"{self.name}/image_mask_ratio": patch_mask.float().mean()}
