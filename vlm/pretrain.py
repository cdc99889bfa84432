"""The model and its objectives as one module, the unit DeepSpeed wraps.

Objectives own their parameters (temperatures, biases, heads), so they live beside the
model rather than inside it; the weighted sum of their losses is the training loss.

Two kinds of objective:
- *coupled* ones (`batch_coupled = True`, e.g. InfoNCE) score every sample against the
  whole global batch and read only the model's outputs (embeddings): the gradient cache
  (vlm/gradcache.py) computes them once on the embeddings of all micro-batches;
- *per-sample* ones (everything else, including any objective with `uses_model = True`,
  which is called as `objective(outputs, batch, model=self.model)` so it can run parts of
  the model itself, e.g. MAE's masked encoder) accumulate micro-batch by micro-batch.

forward() runs in one of three modes so that everything touching parameters happens
inside the module DeepSpeed wraps (ZeRO-3 gathers parameters in forward hooks):
  "train"    the plain step: outputs, every objective, the weighted total;
  "embed"    only the outputs the coupled objectives read (the cache's no-grad pass);
  "replay"   re-run one micro-batch with gradients and return the surrogate loss whose
             gradient is the cached one (see vlm/gradcache.py)."""
from __future__ import annotations

import torch
from torch import nn

from vlm.models import CLIP

MODEL_PREFIX = "model."


class Pretrainer(nn.Module):
    def __init__(self, model: CLIP, objectives: list[nn.Module], weights: list[float]):
        super().__init__()
        if len(objectives) != len(weights) or not objectives:
            raise ValueError("need one weight per objective, and at least one objective")
        self.model = model
        self.objectives = nn.ModuleList(objectives)
        self.weights = list(weights)
        self.needs = frozenset().union(*(getattr(o, "needs", frozenset()) for o in objectives))
        self.coupled = [i for i, o in enumerate(objectives)
                        if getattr(o, "batch_coupled", False) and not getattr(o, "uses_model", False)]
        self.per_sample = [i for i in range(len(objectives)) if i not in self.coupled]
        self.coupled_keys = sorted(frozenset().union(*(objectives[i].needs for i in self.coupled))) \
            if self.coupled else []

    @property
    def needs_views(self) -> bool:
        return "view_pooled" in self.needs

    def outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(batch["images"], batch["tokens"], batch["eot_index"])
        if self.needs_views:
            out["view_pooled"] = self.model.visual(batch["views"])["pooled"]
        return out

    def losses(self, out: dict, batch: dict, which: list[int], scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The objectives `which` on (out, batch): their named losses, diagnostics ("a/b",
        detached) and "loss", their weighted sum times `scale` (None when `which` is empty)."""
        result: dict[str, torch.Tensor] = {}
        total = None
        for i in which:
            objective, weight = self.objectives[i], self.weights[i]
            if getattr(objective, "uses_model", False):
                named = objective(out, batch, model=self.model)
            else:
                named = objective(out, batch)
            for key, value in named.items():
                if "/" in key:
                    result[key] = value.detach()
                    continue
                result[key] = value
                total = weight * value if total is None else total + weight * value
        result["loss"] = None if total is None else total * scale
        return result

    def forward(self, batch: dict[str, torch.Tensor], mode: str = "train", **kw) -> dict[str, torch.Tensor]:
        """batch: images [b,3,S,S], tokens [b,L], eot_index [b], labels [b], views [2b,3,S,S]
        (the last two when an objective needs them).

        mode "train" -> {"loss": weighted total, each objective's named losses, diagnostics
        named "objective/what" (detached)};
        "embed" -> {key: [b, ...]} for coupled_keys;
        "coupled" (kw: out) -> the coupled objectives' losses on precomputed outputs `out`
        (the gradient cache differentiates them with respect to `out`);
        "replay" -> the surrogate "loss" of one micro-batch and its per-sample losses; kw:
        n_micro, and either grads {key: cached dL/d out} or, for the micro-batch that also
        carries the objectives' own parameter gradients, whole {key: every micro-batch's
        detached outputs}, whole_batch (their batch) and rows (start, end) of this one."""
        if mode == "train":
            return self.losses(self.outputs(batch), batch, list(range(len(self.objectives))))
        if mode == "embed":
            out = self.outputs(batch)
            return {k: out[k] for k in self.coupled_keys}
        if mode == "coupled":
            return self.losses(kw["out"], batch, self.coupled)
        if mode == "replay":
            return self._replay(batch, **kw)
        raise ValueError(f"unknown Pretrainer mode {mode!r}")

    def _replay(self, batch, *, n_micro: int, grads: dict | None = None, whole: dict | None = None,
                whole_batch: dict | None = None, rows: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        out = self.outputs(batch)
        # The engine divides every micro-batch's loss by n_micro (gradient accumulation);
        # the coupled term is the gradient of the whole step's coupled loss: undo that.
        if grads is not None:
            surrogate = sum((out[k] * grads[k]).sum() for k in self.coupled_keys) * n_micro
        else:
            a, b = rows
            spliced = {k: torch.cat([whole[k][:a], out[k], whole[k][b:]]) for k in self.coupled_keys}
            surrogate = self.losses(spliced, whole_batch, self.coupled)["loss"] * n_micro
        result = self.losses(out, batch, self.per_sample) if self.per_sample else {"loss": None}
        per_sample = result.pop("loss")
        result["loss"] = surrogate if per_sample is None else surrogate + per_sample
        return result


def model_state_from_pretrainer(state: dict) -> dict:
    """A Pretrainer state dict -> the CLIP model's own (what evaluation loads)."""
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
