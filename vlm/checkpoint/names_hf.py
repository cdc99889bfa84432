"""Hugging Face transformers' CLIPModel names and config.json <-> this project's (ViT CLIPs).

CLIPModel holds the same tensors as our ViT CLIP under other names, with one layout
difference: its attention has separate q, k and v projections where ours has one fused
qkv projection (their rows stacked in that order), so a conversion splits or stacks them.
The projections are nn.Linear weights on both sides. Its `logit_scale` is log(1/T), as in
our InfoNCE objective; CLIPModel has no logit bias (SigLIP is another class there). It has
no ResNet image tower, so RN50-style models cannot go to or come from it."""
from __future__ import annotations

import re

import torch

from vlm.models.config import ModelConfig

_EMBED = {"visual.patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
          "visual.cls_token": "vision_model.embeddings.class_embedding",
          "visual.pos_embed": "vision_model.embeddings.position_embedding.weight",
          "visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
          "visual.proj": "visual_projection",
          "text.token_embed": "text_model.embeddings.token_embedding",
          "text.pos_embed": "text_model.embeddings.position_embedding.weight",
          "text.ln_final": "text_model.final_layer_norm", "text.proj": "text_projection"}
_BLOCK = {"ln1": "layer_norm1", "attn.proj": "self_attn.out_proj", "ln2": "layer_norm2",
          "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
_TOWER = {"visual": "vision_model", "text": "text_model"}
# CLIP's tokenizer ids, which CLIPModel's text pooling looks for (the first end-of-text)
CLIP_BOS, CLIP_EOS, CLIP_PAD = 49406, 49407, 1


def _block(name: str) -> tuple[str, str, str] | None:
    m = re.fullmatch(r"(visual|text)\.transformer\.blocks\.(\d+)\.(.+)", name)
    return m.groups() if m else None


def to_hf(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ViT CLIP state dict (towers only) -> CLIPModel's (without logit_scale)."""
    out = {}
    for name, tensor in weights.items():
        if (parts := _block(name)) is not None:
            tower, i, rest = parts
            prefix = f"{_TOWER[tower]}.encoder.layers.{i}"
            if rest.startswith("attn.qkv."):
                for which, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                    out[f"{prefix}.self_attn.{which}_proj.{rest.rsplit('.', 1)[1]}"] = chunk.contiguous()
                continue
            out[f"{prefix}.{_swap(rest, _BLOCK)}"] = tensor
        else:
            out[_swap(name, _EMBED)] = tensor
    return out


def _swap(name: str, table: dict[str, str]) -> str:
    for ours in sorted(table, key=len, reverse=True):
        if name == ours or name.startswith(ours + "."):
            return table[ours] + name[len(ours):]
    raise ValueError(f"Hugging Face's CLIPModel has no tensor for {name}")


def from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """CLIPModel's state dict -> ours, for a model of shape `cfg`; a missing tensor is a
    ValueError naming it."""
    from vlm.models.registry import build_model

    with torch.device("meta"):
        names = list(build_model(cfg).state_dict())
    out, missing = {}, []
    for name in names:
        parts = _block(name)
        if parts is not None and parts[2].startswith("attn.qkv."):
            tower, i, rest = parts
            kind = rest.rsplit(".", 1)[1]
            keys = [f"{_TOWER[tower]}.encoder.layers.{i}.self_attn.{w}_proj.{kind}" for w in "qkv"]
            missing += [k for k in keys if k not in state]
            if all(k in state for k in keys):
                out[name] = torch.cat([state[k] for k in keys], dim=0)
            continue
        theirs = (f"{_TOWER[parts[0]]}.encoder.layers.{parts[1]}.{_swap(parts[2], _BLOCK)}" if parts
                  else _swap(name, _EMBED))
        if theirs in state:
            out[name] = state[theirs]
        else:
            missing.append(theirs)
    if missing:
        raise ValueError(f"the Hugging Face CLIPModel state dict lacks {len(missing)} tensor(s): "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return out


_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu"}


def config_to_ours(config: dict) -> ModelConfig:
    """A CLIPModel config.json -> our ModelConfig; what we do not build is a ValueError."""
    if config.get("model_type") not in (None, "clip"):
        raise ValueError(f"config.json is a {config.get('model_type')!r} model, not a CLIP (model_type clip)")
    v, t = config.get("vision_config") or {}, config.get("text_config") or {}
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= set(_ACTS):
        raise ValueError(f"hidden_act {sorted(acts)}: vlm builds one activation for both towers, gelu or quick_gelu")
    eps = {v.get("layer_norm_eps", 1e-5), t.get("layer_norm_eps", 1e-5)}
    if eps != {1e-5}:
        raise ValueError(f"layer_norm_eps {sorted(eps)}: vlm's layer norms use 1e-5")
    vw, tw = v.get("hidden_size", 768), t.get("hidden_size", 512)
    vision = {"type": "vit", "image_size": v.get("image_size", 224), "patch_size": v.get("patch_size", 32),
              "width": vw, "depth": v.get("num_hidden_layers", 12), "heads": v.get("num_attention_heads", 12),
              "mlp_ratio": v.get("intermediate_size", 3072) / vw}
    text = {"vocab_size": t.get("vocab_size", 49408), "context_length": t.get("max_position_embeddings", 77),
            "width": tw, "depth": t.get("num_hidden_layers", 12), "heads": t.get("num_attention_heads", 8),
            "mlp_ratio": t.get("intermediate_size", 2048) / tw}
    return ModelConfig(embed_dim=config.get("projection_dim", 512), vision=vision, text=text,
                       activation=_ACTS[acts.pop()])


def config_from_ours(cfg: ModelConfig, *, logit_scale: float, eos_token_id: int = CLIP_EOS) -> dict:
    """Our ModelConfig -> a CLIPModel config.json (transformers fills every other field
    with its defaults). eos_token_id: where CLIPModel pools the text (its first occurrence)."""
    v, t = cfg.vision, cfg.text
    if v.type != "vit":
        raise ValueError("Hugging Face's CLIPModel has no ResNet image tower: a ResNet CLIP converts to "
                         "openclip or vlm only")
    if not t.causal:
        raise ValueError("Hugging Face's CLIPModel has a causal text tower; this model's is bidirectional")
    common = {"hidden_act": cfg.activation, "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim,
              "attention_dropout": 0.0, "dropout": 0.0}
    vision = {**common, "model_type": "clip_vision_model", "hidden_size": v.width,
              "intermediate_size": int(v.width * v.mlp_ratio), "num_hidden_layers": v.depth,
              "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
              "num_channels": 3}
    text = {**common, "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": int(t.width * t.mlp_ratio), "num_hidden_layers": t.depth,
            "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
            "bos_token_id": CLIP_BOS, "eos_token_id": eos_token_id, "pad_token_id": CLIP_PAD}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
            "logit_scale_init_value": logit_scale, "dtype": "float32",
            "text_config": text, "vision_config": vision}
