"""The module DeepSpeed wraps: the model and its objectives as one Pretrainer, and building it.

Objectives own their parameters (temperatures, biases, heads), so they live beside the
model rather than inside it; the weighted sum of their losses is the training loss.

Two kinds of objective:
- *coupled* ones (`batch_coupled = True`, e.g. InfoNCE) score every sample against the
  whole global batch and read only the model's outputs (embeddings): the gradient cache
  (vlm/train/gradcache.py) computes them once on the embeddings of all micro-batches;
- *per-sample* ones (everything else, including any objective with `uses_model = True`,
  which is called as `objective(outputs, batch, model=self.model)` so it can run parts of
  the model itself, e.g. MAE's masked encoder) accumulate micro-batch by micro-batch.

forward() runs in one of three modes so that everything touching the model's parameters
happens inside the module DeepSpeed wraps (ZeRO-3 gathers parameters in forward hooks);
the cache's coupled pass calls `losses(..., hooks=False)` on gathered parameters:
  "train"    the plain step: outputs, every objective, the weighted total;
  "embed"    only the outputs the coupled objectives read (the cache's no-grad pass);
  "replay"   re-run one micro-batch with gradients and return the surrogate loss whose
             gradient is the cached one (see vlm/train/gradcache.py)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from vlm.config import RunConfig
from vlm.models.clip import CLIP
from vlm.models.registry import build_model
from vlm.objectives.registry import build_objective

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

    def losses(self, out: dict, batch: dict, which: list[int], scale: float = 1.0,
               hooks: bool = True) -> dict[str, torch.Tensor]:
        """The objectives `which` on (out, batch): their named losses, diagnostics ("a/b",
        detached) and "loss", their weighted sum times `scale` (None when `which` is empty).
        hooks=False calls the objectives' forward directly, past any module hooks (the
        gradient cache's coupled pass, whose parameters the caller has gathered)."""
        result: dict[str, torch.Tensor] = {}
        total = None
        for i in which:
            objective, weight = self.objectives[i], self.weights[i]
            call = objective if hooks else objective.forward
            if getattr(objective, "uses_model", False):
                named = call(out, batch, model=self.model)
            else:
                named = call(out, batch)
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
        "replay" -> the surrogate "loss" of one micro-batch and its per-sample losses; kw:
        n_micro, grads {key: cached dL/d out of this micro-batch's rows}, param_grads {name:
        cached dL/d p of the coupled objectives' parameters}; the result also holds
        "_per_sample_total" (their weighted sum, detached) and, with keep_outputs,
        "_outputs" (this micro-batch's coupled outputs)."""
        if mode == "train":
            return self.losses(self.outputs(batch), batch, list(range(len(self.objectives))))
        if mode == "embed":
            out = self.outputs(batch)
            return {k: out[k] for k in self.coupled_keys}
        if mode == "replay":
            return self._replay(batch, **kw)
        raise ValueError(f"unknown Pretrainer mode {mode!r}")

    def coupled_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The coupled objectives' own trainable parameters (temperature, bias, heads)."""
        return [(f"objectives.{i}.{n}", p) for i in self.coupled
                for n, p in self.objectives[i].named_parameters() if p.requires_grad]

    def _replay(self, batch, *, n_micro: int, grads: dict, param_grads: dict | None = None,
                keep_outputs: bool = False) -> dict[str, torch.Tensor]:
        out = self.outputs(batch)
        # The engine divides every micro-batch's loss by n_micro (gradient accumulation):
        # the embeddings' term carries the whole step's gradient of this micro-batch's rows,
        # so it is multiplied back; the objectives' parameters get their whole-batch
        # gradient a 1/n_micro share per micro-batch (every parameter receives a gradient
        # in every micro-batch, as in a plain step: ZeRO-3 mis-accumulates otherwise).
        surrogate = sum((out[k] * grads[k]).sum() for k in self.coupled_keys) * n_micro
        if param_grads:
            params = self.coupled_parameters()
            with gathered([p for _, p in params]):
                surrogate = surrogate + sum((p * param_grads[n]).sum() for n, p in params)
        result = self.losses(out, batch, self.per_sample) if self.per_sample else {"loss": None}
        per_sample = result.pop("loss")
        result["loss"] = surrogate if per_sample is None else surrogate + per_sample
        result["_per_sample_total"] = None if per_sample is None else per_sample.detach()
        if keep_outputs:
            result["_outputs"] = {k: out[k] for k in self.coupled_keys}
        return result


def build_pretrainer(cfg: RunConfig, vocab_size: int) -> Pretrainer:
    """The run's model (cfg.model) and objectives (cfg.objectives, with their weights)."""
    model = build_model(cfg.model, vocab_size)
    pooled_dim = getattr(model.visual, "pooled_dim", cfg.model.vision.width)
    objectives = [build_objective(o, embed_dim=cfg.model.embed_dim, vision_width=pooled_dim, model=model,
                                  vocab_size=vocab_size, kernels=cfg.kernels) for o in cfg.objectives]
    return Pretrainer(model, objectives, [o.weight for o in cfg.objectives])


def gathered(params: list):
    """Under ZeRO-3 (parameters carry DeepSpeed's `ds_id`), these parameters gathered whole
    while the block runs; otherwise nothing to do."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def model_state_from_pretrainer(state: dict) -> dict:
    """A Pretrainer state dict -> the CLIP model's own (what evaluation loads)."""
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
