"""Builds models from their configs: the towers of a ModelConfig as a CLIP module, and their sizes.

    model = build_model(get_config("ViT-B-16"))   # vocabulary from cfg.text.vocab_size
    describe("ViT-B-16")                          # parameter counts and forward FLOPs

Presets by name (get_config, list_presets, preset_dict) live in vlm.models.presets, free of torch.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlm.models.clip import CLIP
from vlm.models.config import ModelConfig
from vlm.models.decoder import CaptionDecoder
from vlm.models.fusion import FusionEncoder
from vlm.models.presets import get_config
from vlm.models.resnet import ModifiedResNet
from vlm.models.text import TextTransformer
from vlm.models.vit import VisionTransformer

# CLIP's byte-pair vocabulary: what `describe` counts with when a preset leaves the
# vocabulary to the run's tokenizer and no size is given.
CLIP_VOCAB_SIZE = 49408


def build_vision(cfg: ModelConfig) -> nn.Module:
    """The image tower; its `image_mean`/`image_std` attributes are the normalisation its
    inputs need (model.vision; read by evaluation, vlm.data.pixels.tower_norm)."""
    tower = _vision_tower(cfg)
    tower.image_mean, tower.image_std = tuple(cfg.vision.image_mean), tuple(cfg.vision.image_std)
    return tower


def _vision_tower(cfg: ModelConfig) -> nn.Module:
    v = cfg.vision
    if v.type == "resnet":
        return ModifiedResNet(image_size=v.image_size, layers=v.layers, width=v.width, heads=v.heads,
                              embed_dim=cfg.embed_dim, grad_checkpointing=cfg.grad_checkpointing)
    return VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width, depth=v.depth,
                             heads=v.heads, embed_dim=cfg.embed_dim, mlp_ratio=v.mlp_ratio,
                             grad_checkpointing=cfg.grad_checkpointing, dropout=cfg.dropout,
                             drop_path=cfg.drop_path, activation=cfg.activation)


def build_model(cfg: ModelConfig, vocab_size: int | None = None) -> CLIP:
    """The two towers of `cfg`; the vocabulary is cfg.text.vocab_size, else `vocab_size`
    (the run's trained tokenizer)."""
    t = cfg.text
    vocab = t.vocab_size if t.vocab_size is not None else vocab_size
    if vocab is None:
        raise ValueError("the text vocabulary size is unknown: set model.text.vocab_size or pass vocab_size")
    text = TextTransformer(vocab_size=vocab, context_length=t.context_length, width=t.width, depth=t.depth,
                           heads=t.heads, embed_dim=cfg.embed_dim, mlp_ratio=t.mlp_ratio, causal=t.causal,
                           grad_checkpointing=cfg.grad_checkpointing, dropout=cfg.dropout, drop_path=cfg.drop_path,
                           activation=cfg.activation)
    vision = build_vision(cfg)
    fusion = decoder = None
    image_width = vision.pooled_dim
    if cfg.fusion is not None:
        f = cfg.fusion
        fusion = FusionEncoder(type=f.type, image_width=image_width, text_width=t.width, width=f.width,
                               depth=f.depth, heads=f.heads, mlp_ratio=f.mlp_ratio)
    if cfg.decoder is not None:
        d = cfg.decoder
        decoder = CaptionDecoder(vocab_size=vocab, width=t.width, image_width=image_width, depth=d.depth,
                                 heads=d.heads, mlp_ratio=d.mlp_ratio, context_length=t.context_length)
    return CLIP(vision, text, fusion, decoder)


def _resolve(name_or_cfg: str | ModelConfig) -> ModelConfig:
    if isinstance(name_or_cfg, ModelConfig):
        return name_or_cfg
    try:
        return get_config(name_or_cfg)
    except KeyError as e:
        raise ValueError(e.args[0]) from None


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def describe(name_or_cfg: str | ModelConfig, vocab_size: int | None = None) -> dict:
    """Parameter counts and forward FLOPs per sample (batch 1, full image size, full text
    context). A multiply-add counts as 2 FLOPs; only matrix products, convolutions and
    attention are counted (norms, activations and softmax are not). The model is built on
    the meta device, so even ViT-L/14 costs no memory. Raises ValueError for an unknown name."""
    cfg = _resolve(name_or_cfg)
    vocab = next(v for v in (cfg.text.vocab_size, vocab_size, CLIP_VOCAB_SIZE) if v is not None)
    with torch.device("meta"):
        model = build_model(cfg, vocab).eval()
        images = torch.empty(1, 3, cfg.vision.image_size, cfg.vision.image_size)
        tokens = torch.zeros(1, cfg.text.context_length, dtype=torch.long)
        eot = torch.full((1,), cfg.text.context_length - 1, dtype=torch.long)
        with torch.no_grad():
            vision_flops = _flops(model.visual, images)
            text_flops = _flops(model.text, tokens, eot)
    return {
        "preset": cfg.preset, "vision_type": cfg.vision.type, "image_size": cfg.vision.image_size,
        "context_length": cfg.text.context_length, "vocab_size": vocab, "embed_dim": cfg.embed_dim,
        "params_total": _numel(model), "params_vision": _numel(model.visual), "params_text": _numel(model.text),
        "flops_vision": vision_flops, "flops_text": text_flops, "flops_total": vision_flops + text_flops,
    }
