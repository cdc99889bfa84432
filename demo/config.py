"""The demo's own config section (`demo:` in a config file): the synthetic corpus's settings.

A config file such as configs/demo.yaml holds the run's config tree (vlm.config.RunConfig)
and, beside it, a top-level `demo:` section that only `vlm demo` reads; every other command
leaves it alone (vlm.config.OTHER_SECTIONS). `--set demo.corpus.num_train=100` overrides it
like any other key. The demo records its section in the run directory (demo.yaml), where
`vlm caption --data synthetic-seen` finds the corpus a run was trained on."""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlm.config import ConfigError, RunConfig, format_validation_error, load_config, read_config_tree

SECTION = "demo"
SAVED_NAME = "demo.yaml"  # the demo section of a run, in its run directory


class CorpusConfig(BaseModel):
    """The procedural colour/shape corpus used for tests and smoke runs."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    num_train: int = Field(6000, ge=0)
    num_heldout: int = Field(600, ge=0)
    image_size: int = Field(64, ge=16, le=4096)
    broken_urls: bool = True


class DemoConfig(BaseModel):
    """The `demo:` section: what `vlm demo` needs beyond the run's config."""

    model_config = ConfigDict(extra="forbid")

    corpus: CorpusConfig = CorpusConfig()


class _File(BaseModel):
    """A config file as the demo reads it: its `demo:` section; the rest is RunConfig's."""

    model_config = ConfigDict(extra="ignore")

    demo: DemoConfig = DemoConfig()


def demo_section(tree: dict) -> DemoConfig:
    """The validated `demo:` section of a config tree; a tree written before the section
    existed keeps its corpus under data.corpus, under what demo.corpus sets."""
    section = tree.get(SECTION)
    section = dict(section) if isinstance(section, dict) else section
    legacy = tree["data"].get("corpus") if isinstance(tree.get("data"), dict) else None
    if isinstance(legacy, dict) and (section is None or isinstance(section, dict)):
        section = section or {}
        corpus = section.get("corpus")
        section["corpus"] = {**legacy, **corpus} if isinstance(corpus, dict) else legacy if corpus is None else corpus
    try:
        return _File.model_validate({SECTION: section} if section is not None else {}).demo
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, root=_File)) from None


def load_demo_config(path: str | os.PathLike | None,
                     overrides: list[str] = ()) -> tuple[RunConfig, DemoConfig]:
    """A config file + `--set` overrides -> (the run's config, the demo's section)."""
    return load_config(path, overrides), demo_section(read_config_tree(path, overrides))


def save_demo_config(run_dir: str | os.PathLike, demo: DemoConfig) -> Path:
    """Writes the demo section of a run beside its config.yaml."""
    out = Path(run_dir) / SAVED_NAME
    out.write_text(yaml.safe_dump({SECTION: demo.model_dump(mode="json")}, sort_keys=False))
    return out


def saved_demo_config(*places: str | os.PathLike) -> DemoConfig:
    """The demo section saved in the first of `places` (run directories, or a checkpoint
    directory RUN_DIR/checkpoints/step_N) that holds one; the defaults if none."""
    for place in places:
        p = Path(place)
        for run_dir in (p, p.parent.parent) if p.parent.name == "checkpoints" else (p,):
            saved = run_dir / SAVED_NAME
            if saved.is_file():
                return demo_section(yaml.safe_load(saved.read_text()) or {})
    return DemoConfig()
