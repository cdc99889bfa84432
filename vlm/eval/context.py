"""What every evaluation protocol reads: one evaluation set's gathered features and its classes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm.config import EvalConfig


@dataclass
class EvalContext:
    """The input of a protocol function (vlm/eval/runner.py's PROTOCOLS).

    ``feats``: vlm.eval.features.gather_shares's output for the evaluation set; ``labels``:
    each item's label (None where it has none). The class fields are filled when a task
    needs classes: class i is label value ``class_labels[i]``, named ``class_names[i]``,
    embedded as ``class_embed[i]`` from ``templates``. ``probe_feats``/``probe_labels``:
    the features of a separate probe-train set (`--probe-train`), else None."""
    ev: EvalConfig
    labels: list
    feats: dict = field(default_factory=dict)
    class_labels: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    classnames_source: str = ""
    class_embed: torch.Tensor | None = None
    templates: list[str] = field(default_factory=list)
    templates_source: str = ""
    probe_feats: dict | None = None
    probe_labels: list[str] | None = None
