"""The optimizer: AdamW's parameter groups (what gets weight decay) and the learning-rate schedule."""
from __future__ import annotations

import math

import torch

NO_DECAY_NAMES = ("logit_scale", "logit_bias", "pos_embed", "cls_token", "positional_embedding")


def lr_lambda(cfg) -> callable:
    """Linear warmup then cosine decay to min_lr_ratio, as a multiplier of the base lr."""
    o, steps = cfg.optim, cfg.train.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, positional embeddings, the class token, and the
    objectives' temperatures and logit biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg, model: torch.nn.Module) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The run's AdamW over param_groups and its LambdaLR schedule (lr_lambda)."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
