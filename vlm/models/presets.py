"""Model presets by name (torch-free): each is a YAML file of ModelConfig fields in vlm/models/configs/.

    cfg = get_config("ViT-B-16")             # a validated ModelConfig
    list_presets()                            # the registered names
"""
from __future__ import annotations

from pathlib import Path

import yaml

from vlm.models.config import ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"


def list_presets() -> list[str]:
    return sorted((p.stem for p in CONFIG_DIR.glob("*.yaml")), key=str.lower)


def preset_dict(name: str) -> dict:
    """The preset's fields as a plain dict, with `preset` set to its name."""
    path = CONFIG_DIR / f"{name}.yaml"
    if name not in list_presets():
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(list_presets())}")
    return {**yaml.safe_load(path.read_text()), "preset": name}


def get_config(name: str) -> ModelConfig:
    return ModelConfig(**preset_dict(name))
