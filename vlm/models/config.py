"""Model architecture configs: pydantic only, no torch; registered presets live in
vlm/models/configs/ as YAML files of these fields."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VisionConfig(Strict):
    image_size: int = Field(32, gt=0)
    patch_size: int = Field(4, gt=0)
    width: int = Field(128, gt=0)
    depth: int = Field(3, gt=0)
    heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(2.0, gt=0)


class TextConfig(Strict):
    context_length: int = Field(24, gt=1)
    width: int = Field(128, gt=0)
    depth: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(2.0, gt=0)


class ModelConfig(Strict):
    embed_dim: int = Field(64, gt=0)
    init_temperature: float = Field(0.07, gt=0)
    grad_checkpointing: bool = False
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
