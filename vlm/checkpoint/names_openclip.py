"""OpenCLIP's tensor names and model config <-> this project's (ViT and modified-ResNet CLIPs).

OpenCLIP's `CLIP` module and ours hold the same tensors under other names. Three differ
in layout as well: OpenCLIP keeps the image and text projections as [width, embed]
matrices applied as `x @ proj` (ours are nn.Linear weights, [embed, width]), and its
temperature `logit_scale` (and SigLIP's `logit_bias`) live in the model, where ours live
in the objective. Everything else maps one to one, so a conversion is a renaming plus two
transposes, and a round trip is exact.

OpenCLIP's model config (its `open_clip_config.json`, `model_cfg`) is what fixes the
attention heads and the activation, which a state dict does not show; without it they are
inferred as OpenCLIP's own defaults would build them (64-wide heads, exact GELU)."""
from __future__ import annotations

import re

import torch

from vlm.models.config import ModelConfig

HEAD_WIDTH = 64  # OpenCLIP's default head width: heads = width // 64 when no config says otherwise

# per-block names, ours -> OpenCLIP's (ViT and text transformer blocks)
_BLOCK = {"ln1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
          "attn.proj": "attn.out_proj", "ln2": "ln_2", "mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}
_VIT = {"visual.patch_embed.weight": "visual.conv1.weight", "visual.cls_token": "visual.class_embedding",
        "visual.pos_embed": "visual.positional_embedding", "visual.ln_pre": "visual.ln_pre",
        "visual.ln_post": "visual.ln_post"}
_TEXT = {"text.token_embed.weight": "token_embedding.weight", "text.pos_embed": "positional_embedding",
         "text.ln_final": "ln_final"}
# the modified ResNet: stem [conv, bn, relu] x 3; a bottleneck's branch [conv1, bn1, relu,
# conv2, bn2, relu, pool, conv3, bn3] and shortcut [pool, conv, bn]
_STEM = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}
_BRANCH = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "7": "conv3", "8": "bn3"}
_SHORTCUT = {"1": "downsample.0", "2": "downsample.1"}
_ATTNPOOL = {"pos_embed": "positional_embedding", "q": "q_proj", "k": "k_proj", "v": "v_proj", "proj": "c_proj"}
_TRANSPOSED = {"visual.proj.weight": "visual.proj", "text.proj.weight": "text_projection"}


def _sub(name: str, table: dict[str, str]) -> str | None:
    """`name` with its longest prefix found in `table` replaced (prefixes end at a dot)."""
    for ours in sorted(table, key=len, reverse=True):
        if name == ours or name.startswith(ours + "."):
            return table[ours] + name[len(ours):]
    return None


def _resnet_stages(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Our flat bottleneck index -> (OpenCLIP stage 1..4, index within the stage)."""
    return [(s + 1, i) for s, n in enumerate(cfg.vision.layers) for i in range(n)]


def openclip_name(name: str, cfg: ModelConfig) -> str:
    """Our CLIP tensor name -> OpenCLIP's; ValueError for a tensor OpenCLIP's CLIP has no place for."""
    if name in _TRANSPOSED:
        return _TRANSPOSED[name]
    m = re.fullmatch(r"(visual|text)\.transformer\.blocks\.(\d+)\.(.+)", name)
    if m:
        tower, i, rest = m.groups()
        prefix = "visual.transformer" if tower == "visual" else "transformer"
        return f"{prefix}.resblocks.{i}.{_sub(rest, _BLOCK) or rest}"
    if cfg.vision.type == "resnet" and name.startswith("visual."):
        out = _resnet_name(name[len("visual."):], cfg)
    else:
        out = _sub(name, _VIT) or _sub(name, _TEXT)
    if out is None:
        raise ValueError(f"OpenCLIP's CLIP has no tensor for {name}")
    return out


def _resnet_name(rest: str, cfg: ModelConfig) -> str | None:
    m = re.fullmatch(r"stem\.(\d+)\.(.+)", rest)
    if m and m.group(1) in _STEM:
        return f"visual.{_STEM[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"blocks\.(\d+)\.(branch|shortcut)\.(\d+)\.(.+)", rest)
    if m:
        stage, i = _resnet_stages(cfg)[int(m.group(1))]
        table = _BRANCH if m.group(2) == "branch" else _SHORTCUT
        if m.group(3) in table:
            return f"visual.layer{stage}.{i}.{table[m.group(3)]}.{m.group(4)}"
    m = re.fullmatch(r"attnpool\.([a-z_]+)(.*)", rest)
    if m and m.group(1) in _ATTNPOOL:
        return f"visual.attnpool.{_ATTNPOOL[m.group(1)]}{m.group(2)}"
    return None


def to_openclip(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our CLIP state dict (towers only) -> OpenCLIP's CLIP state dict (without logit_scale)."""
    out = {}
    for name, tensor in weights.items():
        out[openclip_name(name, cfg)] = tensor.t().contiguous() if name in _TRANSPOSED else tensor
    return out


def from_openclip(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """OpenCLIP's CLIP state dict -> ours, for a model of shape `cfg`. Extra OpenCLIP tensors
    (logit_scale, logit_bias, attention-mask buffers) are left to the caller; a tensor
    our model needs and the source lacks is a ValueError naming it."""
    from vlm.models.registry import build_model

    with torch.device("meta"):
        ours = build_model(cfg).state_dict()
    out, missing = {}, []
    for name in ours:
        theirs = openclip_name(name, cfg)
        if theirs not in state:
            missing.append(theirs)
            continue
        tensor = state[theirs]
        out[name] = tensor.t().contiguous() if name in _TRANSPOSED else tensor
    if missing:
        raise ValueError(f"the OpenCLIP state dict lacks {len(missing)} tensor(s) of a {describe(cfg)} model: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return out


def describe(cfg: ModelConfig) -> str:
    v = cfg.vision
    tower = (f"ViT (width {v.width}, depth {v.depth}, patch {v.patch_size})" if v.type == "vit"
             else f"ResNet (width {v.width}, layers {list(v.layers)})")
    return f"{tower} at {v.image_size}px, text width {cfg.text.width} depth {cfg.text.depth}"


def _count(state: dict, pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.fullmatch(pattern, k))})


def infer_model_cfg(state: dict[str, torch.Tensor]) -> dict:
    """OpenCLIP's `model_cfg` (embed_dim, vision_cfg, text_cfg) as far as a state dict
    shows it: heads and the activation take OpenCLIP's defaults."""
    tw = state["token_embedding.weight"].shape[1]
    text = {"context_length": state["positional_embedding"].shape[0],
            "vocab_size": state["token_embedding.weight"].shape[0], "width": tw, "heads": tw // HEAD_WIDTH,
            "layers": _count(state, r"transformer\.resblocks\.(\d+)\..*"),
            "mlp_ratio": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / tw}
    if "visual.conv1.weight" in state and "visual.class_embedding" in state:
        conv = state["visual.conv1.weight"]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {"width": conv.shape[0], "patch_size": conv.shape[-1], "image_size": grid * conv.shape[-1],
                  "layers": _count(state, r"visual\.transformer\.resblocks\.(\d+)\..*"),
                  "mlp_ratio": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / conv.shape[0]}
        embed = state["visual.proj"].shape[1]
    elif "visual.attnpool.c_proj.weight" in state:
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {"width": state["visual.conv1.weight"].shape[0] * 2, "image_size": grid * 32,
                  "layers": [_count(state, rf"visual\.layer{s}\.(\d+)\..*") for s in range(1, 5)]}
        embed = state["visual.attnpool.c_proj.weight"].shape[0]
    else:
        raise ValueError("not an OpenCLIP CLIP state dict: no visual.conv1 (ViT or modified ResNet) found")
    return {"embed_dim": embed, "quick_gelu": False, "vision_cfg": vision, "text_cfg": text}


def model_cfg_to_ours(model_cfg: dict) -> ModelConfig:
    """OpenCLIP's model_cfg -> our ModelConfig; a feature we do not build is a ValueError."""
    v, t = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    unsupported = [f"vision_cfg.{k}" for k in ("timm_model_name", "attentional_pool", "ls_init_value", "no_ln_pre")
                   if v.get(k)] + [f"text_cfg.{k}" for k in ("hf_model_name", "ls_init_value", "embed_cls", "proj_bias",
                                                            "no_causal_mask") if t.get(k)]
    unsupported += [f"text_cfg.pool_type={t['pool_type']}" for _ in [0] if t.get("pool_type", "argmax") != "argmax"]
    if unsupported:
        raise ValueError(f"this OpenCLIP model uses what vlm's CLIP does not build: {', '.join(unsupported)}")
    head_width = v.get("head_width", HEAD_WIDTH)
    if isinstance(v.get("layers"), (list, tuple)):
        vision = {"type": "resnet", "image_size": v.get("image_size", 224), "width": v.get("width", 64),
                  "layers": tuple(v["layers"]), "heads": v.get("width", 64) * 32 // head_width}
    else:
        width = v.get("width", 768)
        vision = {"type": "vit", "image_size": v.get("image_size", 224), "patch_size": v.get("patch_size", 16),
                  "width": width, "depth": v.get("layers", 12), "heads": width // head_width,
                  "mlp_ratio": v.get("mlp_ratio", 4.0)}
    text = {"vocab_size": t.get("vocab_size", 49408), "context_length": t.get("context_length", 77),
            "width": t.get("width", 512), "depth": t.get("layers", 12), "heads": t.get("heads", 8),
            "mlp_ratio": t.get("mlp_ratio", 4.0)}
    return ModelConfig(embed_dim=model_cfg["embed_dim"], vision=vision, text=text,
                       activation="quick_gelu" if model_cfg.get("quick_gelu") else "gelu")


def model_cfg_from_ours(cfg: ModelConfig) -> dict:
    """Our ModelConfig -> OpenCLIP's model_cfg (what its open_clip_config.json holds)."""
    v, t = cfg.vision, cfg.text
    if v.type == "resnet":
        vision = {"image_size": v.image_size, "layers": list(v.layers), "width": v.width,
                  "head_width": v.width * 32 // v.heads}
    else:
        vision = {"image_size": v.image_size, "layers": v.depth, "width": v.width, "patch_size": v.patch_size,
                  "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio}
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.depth, "mlp_ratio": t.mlp_ratio}
    return {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.activation == "quick_gelu",
            "vision_cfg": vision, "text_cfg": text}
