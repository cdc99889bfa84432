"""Zero-shot dense prediction (MaskCLIP, Zhou et al. 2022) and its mIoU.

A CLIP ViT's patch tokens after the last block are poor at localisation: the last
attention layer mixes every patch with the class token's context. MaskCLIP keeps each
patch's own content instead: in the last block it takes the *value* embedding of every
patch (skipping the query-key attention, i.e. attention replaced by the identity), sends
it through that attention's output projection, then through ``ln_post`` and the image
projection into the joint space, where it is compared with class text embeddings. Like
MaskCLIP, the last block's residual branch and MLP are left out.

The protocol: classes are background (eval.background_prompts) plus the dataset's labels;
each item's mask marks its own class; mIoU is over the classes present in the ground truth,
background included."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm.data.tokenizer import TextEncoder
from vlm.eval.context import EvalContext
from vlm.eval.zeroshot import prompt_embedding
from vlm.models.clip import CLIP
from vlm.models.vit import VisionTransformer


@torch.no_grad()
def patch_features(visual: VisionTransformer, images: torch.Tensor, mode: str = "maskclip") -> torch.Tensor:
    """images [B, 3, S, S] -> L2-normalised per-patch embeddings [B, g, g, E] (g = S / patch).

    mode "maskclip": last block's value embeddings → its output projection → ln_post → proj;
    mode "tokens": the ordinary patch tokens after ln_post → proj."""
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"dense prediction needs a ViT image tower, not {type(visual).__name__}")
    b = images.shape[0]
    g = int(visual.num_patches ** 0.5)
    if mode == "tokens":
        tokens = visual(images)["tokens"]
    elif mode == "maskclip":
        x = visual.patch_embed(images).flatten(2).transpose(1, 2) + visual.pos_embed[1:]
        cls = (visual.cls_token + visual.pos_embed[0]).expand(b, 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1))
        *body, last = visual.transformer.blocks
        for block in body:
            x = block(x)
        width = x.shape[-1]
        value = last.attn.qkv(last.ln1(x)).unflatten(-1, (3, width))[:, :, 2]  # heads stay concatenated
        tokens = visual.ln_post(last.attn.proj(value))[:, 1:]
    else:
        raise ValueError(f"unknown dense feature mode {mode!r} (maskclip, tokens)")
    return F.normalize(visual.proj(tokens), dim=-1).view(b, g, g, -1)


def predict_mask(patch_embed: torch.Tensor, class_embed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """patch_embed [g, g, E], class_embed [K, E] -> per-pixel class index [H, W] (long):
    patch logits upsampled bilinearly to the pixel grid, then the argmax."""
    logits = (patch_embed @ class_embed.T).permute(2, 0, 1)[None]  # [1, K, g, g]
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0].argmax(0)


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """pred, target: same-shape class indices -> [K, K] counts, rows = true class."""
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def miou(conf: torch.Tensor) -> dict:
    """Per-class IoU = TP / (TP + FP + FN) over a [K, K] confusion matrix; the mean is over
    the classes present in the ground truth (a class never present and never predicted has
    no IoU; one never present but predicted still costs the others through their FP/FN)."""
    conf = conf.double()
    tp = conf.diag()
    present = conf.sum(1) > 0
    iou = tp / (conf.sum(1) + conf.sum(0) - tp).clamp(min=1)
    return {"dense_miou": iou[present].mean().item(),
            "dense_pixel_acc": (tp.sum() / conf.sum().clamp(min=1)).item(),
            "iou": iou.tolist(), "present": present.tolist()}


def dense_class_embed(model: CLIP, text: TextEncoder, background_prompts: list[str],
                      class_embed: torch.Tensor) -> torch.Tensor:
    """The dense classes' embeddings [K, E]: row 0 the background (its prompts averaged),
    then the zero-shot classes."""
    return torch.cat([prompt_embedding(model, text, background_prompts)[None], class_embed])


def evaluate_dense(ctx: EvalContext) -> dict:
    """The dense protocol: mIoU of the summed confusion matrix -> results["dense"]."""
    return {**miou(ctx.feats["confusion"]), "classnames": ["background", *ctx.class_names],
            "features": ctx.ev.dense_features, "background_in_mean": True}
