"""`model.init_from`: a fresh run starts from converted weights (OpenCLIP, Hugging Face or vlm).

The weights are read by vlm.checkpoint.convert (safetensors, or torch pickles restricted to
tensors) and must fit the configured model exactly: a tensor of another shape, or another
MLP activation, is refused at start with the source's own model config to copy, rather
than half-loaded. Parts the source lacks (a fusion encoder, a caption decoder) keep their
initialisation. The temperature goes to the objective of the same kind (InfoNCE's softmax
scale, or SigLIP's sigmoid scale and bias); a resumed run ignores init_from, its weights
come from the checkpoint."""
from __future__ import annotations

import torch
import yaml

from vlm.checkpoint.convert import Weights, read
from vlm.config import RunConfig


def _source_config(w: Weights) -> str:
    keys = {"embed_dim", "activation", "vision", "text"}
    tree = {k: v for k, v in w.model.model_dump(mode="json").items() if k in keys}
    return yaml.safe_dump({"model": tree}, sort_keys=False, default_flow_style=None).strip()


def _check_fits(w: Weights, state: dict[str, torch.Tensor], spec: str, cfg: RunConfig) -> None:
    extra = sorted(set(w.weights) - set(state))
    wrong = [f"{k} {tuple(w.weights[k].shape)} vs {tuple(state[k].shape)}" for k in w.weights
             if k in state and w.weights[k].shape != state[k].shape]
    problems = []
    if extra:
        problems.append(f"{len(extra)} tensor(s) the configured model lacks ({', '.join(extra[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (source vs config: {'; '.join(wrong[:3])})")
    if w.model.activation != cfg.model.activation:
        problems.append(f"activation {w.model.activation} (the config has {cfg.model.activation})")
    if problems:
        raise ValueError(f"model.init_from {spec} does not fit model: {', '.join(problems)}. The source's "
                         f"model is:\n{_source_config(w)}")


def _carry_temperature(w: Weights, model, cfg: RunConfig) -> list[str]:
    if w.logit_scale is None:
        return ["model.init_from: the source carries no temperature; the objectives keep their init_temperature"]
    sigmoid = w.logit_bias is not None
    for o, module in zip(cfg.objectives, model.objectives):
        if o.name not in ("clip_infonce", "siglip"):
            continue
        if (o.name == "siglip") != sigmoid:
            return [f"model.init_from: the source's {'sigmoid' if sigmoid else 'softmax'} temperature does not "
                    f"carry into objective {o.name}; it keeps its init_temperature"]
        with torch.no_grad():
            module.logit_scale.copy_(w.logit_scale.reshape(module.logit_scale.shape))
            if sigmoid:
                module.logit_bias.copy_(w.logit_bias.reshape(module.logit_bias.shape))
        bias = f", bias {float(w.logit_bias):.3f}" if sigmoid else ""
        return [f"model.init_from: objective {o.name} starts at logit scale {float(w.logit_scale):.4f}{bias}"]
    return []


def apply_init_from(model, cfg: RunConfig) -> list[str]:
    """Loads cfg.model.init_from into `model` (a Pretrainer, before DeepSpeed wraps it);
    returns lines for the run's log."""
    spec = cfg.model.init_from
    kind, path = spec.split(":", 1)
    w = read(path, kind)
    state = model.model.state_dict()
    _check_fits(w, state, spec, cfg)
    model.model.load_state_dict(w.weights, strict=False)
    lines = [f"model.init_from: {len(w.weights)} tensors from {w.kind} weights {path}"]
    fresh = sorted({k.split(".")[0] for k in set(state) - set(w.weights)})
    if fresh:
        lines.append(f"model.init_from: {', '.join(fresh)} not in the source: freshly initialised")
    if tuple(w.model.vision.image_mean) != tuple(cfg.model.vision.image_mean) or \
            tuple(w.model.vision.image_std) != tuple(cfg.model.vision.image_std):
        lines.append(f"warning: model.init_from weights expect image mean {list(w.model.vision.image_mean)} and std "
                     f"{list(w.model.vision.image_std)}; the config normalises with others")
    return lines + _carry_temperature(w, model, cfg)
