"""Model architecture configs (pydantic only, no torch).

Registered presets live in vlm/models/configs/ as YAML files of these fields (see
vlm.models.presets)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# where model.init_from may read weights (vlm.checkpoint.convert reads each)
INIT_SOURCES = ("openclip", "hf", "vlm")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VisionConfig(Strict):
    type: Literal["vit", "resnet"] = "vit"
    image_size: int = Field(32, gt=0)
    patch_size: int = Field(4, gt=0, description="ViT only")
    width: int = Field(128, gt=0, description="ViT width, or the ResNet's base width (64 for RN50)")
    depth: int = Field(3, gt=0, description="ViT only: transformer blocks")
    heads: int = Field(4, gt=0, description="ViT attention heads, or the ResNet's attention-pool heads")
    mlp_ratio: float = Field(2.0, gt=0, description="ViT only")
    layers: tuple[int, int, int, int] = Field((3, 4, 6, 3), description="ResNet only: bottlenecks per stage")
    # the input's normalisation, per channel of the [0, 1] scale (vlm.data.pixels.normalise);
    # CLIP's by default, as OpenCLIP and Hugging Face CLIP weights expect
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = Field((0.26862954, 0.26130258, 0.27577711))

    @model_validator(mode="after")
    def _shape_fits(self) -> VisionConfig:
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std {list(self.image_std)} must be positive")
        if self.type == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.type == "resnet" and self.image_size % 32:
            raise ValueError(f"image_size {self.image_size} is not a multiple of 32 (the ResNet's total stride)")
        if self.type == "resnet" and (self.width % 2 or min(self.layers) < 1):
            raise ValueError("a ResNet needs an even width and at least one block per stage")
        return self


class TextConfig(Strict):
    vocab_size: int | None = Field(None, gt=0, description="None: the run's trained tokenizer decides")
    context_length: int = Field(24, gt=1)
    width: int = Field(128, gt=0)
    depth: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(2.0, gt=0)
    causal: bool = Field(True, description="False: bidirectional (masked language modelling)")


class FusionConfig(Strict):
    """The multimodal encoder of the fusion objectives (ITM, MCM): "concat" runs
    self-attention over [cls; image tokens; text tokens] (FLAVA); "cross" runs the text
    tokens through self-attention then cross-attention to the image tokens (ALBEF/BLIP)."""
    type: Literal["concat", "cross"] = "concat"
    width: int = Field(128, gt=0)
    depth: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(2.0, gt=0)


class DecoderConfig(Strict):
    """CoCa's multimodal text decoder: blocks of causal self-attention and cross-attention
    to the image tokens on top of the (causal) text tower, at the text tower's width."""
    depth: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(2.0, gt=0)


class ModelConfig(Strict):
    preset: str | None = Field(None, description="the registered preset these fields came from (a label only)")
    embed_dim: int = Field(64, gt=0)
    grad_checkpointing: bool = False
    dropout: float = Field(0.0, ge=0, lt=1, description="transformer towers: attention and branch-output dropout")
    drop_path: float = Field(0.0, ge=0, lt=1, description="transformer towers: stochastic depth of the last block")
    activation: Literal["gelu", "quick_gelu"] = Field(
        "gelu", description="transformer towers' MLP; quick_gelu = x * sigmoid(1.702 x), OpenAI CLIP weights'")
    init_from: str | None = Field(None, description="openclip:PATH | hf:PATH | vlm:PATH: a fresh run starts from "
                                  "these weights (and their temperature); see `vlm ckpt convert`")
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    fusion: FusionConfig | None = Field(None, description="multimodal encoder (objectives itm, mcm)")
    decoder: DecoderConfig | None = Field(None, description="caption decoder (objective itg, `vlm caption`)")

    @model_validator(mode="after")
    def _decoder_needs_causal_text(self) -> ModelConfig:
        if self.init_from is not None and self.init_from.split(":", 1)[0] not in INIT_SOURCES:
            raise ValueError(f"init_from {self.init_from!r} must start with one of "
                             f"{', '.join(k + ':' for k in INIT_SOURCES)} (e.g. openclip:/path/model.pt)")
        if self.decoder is not None and not self.text.causal:
            raise ValueError("model.decoder (captioning) needs a causal text tower: set model.text.causal=true")
        return self
