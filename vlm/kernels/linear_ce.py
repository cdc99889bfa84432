"""Fused vocabulary projection + cross-entropy that never holds the [N, V] logits.

A language-model head computes `hidden @ weight.T + bias` ([N, V]) only to reduce it to one
number per token. With N = 8192 tokens and V = 32000 that is 1 GiB of fp32 logits, and
autograd keeps another one or two tensors of that size (log-softmax, its gradient), which is
far more than the activations of the rest of a small model. Cross-entropy only needs, per
token, the log-sum-exp of its logits and its target logit (plus the sum of its logits for
label smoothing), and the gradient of the logits is `softmax - onehot`, which can be rebuilt
from the log-sum-exp alone. So the projection is computed tile by tile:

* forward: for each block of tokens, walk the vocabulary in chunks, keep a running maximum
  and running sum of exponentials per token (an online log-sum-exp, as in flash attention),
  pick up the target logit in the chunk that holds it; keep only the log-sum-exp, O(N);
* backward: recompute each tile's logits, turn them into the logit gradient
  `(softmax - (1 - eps) onehot - eps / V) * g_token`, and contract it at once with the
  weight chunk (-> d_hidden) and the hidden block (-> d_weight chunk, d_bias chunk).

The largest temporary is one chunk_tokens x chunk_vocab tile; the price is computing the
projection twice (forward, and again in backward). Ignored targets (ignore_index) are
dropped before any tile is formed, so padding costs nothing.

The idea is public: Liger-Kernel's fused linear cross-entropy chunks the tokens and writes
the logit gradient during the forward pass, and Apple's Cut Cross-Entropy (Wijmans et al.,
2024) tiles both tokens and vocabulary and recomputes the logits in the backward pass, which
is the variant followed here because it keeps memory independent of V as well.

`impl`: "torch" is the tiled algorithm in plain torch (any device; the CPU/CI path);
"triton" is the same algorithm as Triton kernels (CUDA, or CPU through TRITON_INTERPRET=1);
"naive" is the textbook formula that materialises the logits (reference and baseline).

Precision: tiles are accumulated in fp32 (fp64 for fp64 inputs, torch/naive only); the loss
is returned in fp32 for fp32/bf16/fp16 inputs, gradients in the dtype of each input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("torch", "triton", "naive")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                         ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: Literal["mean", "sum", "none"] = "mean",
                         impl: Literal["torch", "triton", "naive"] = "torch",
                         chunk_tokens: int = 2048, chunk_vocab: int = 4096) -> Tensor:
    """hidden [N, H], weight [V, H], bias [V] or None, targets [N] integer -> the loss of
    `F.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=, label_smoothing=,
    reduction=)`: a scalar for "mean" (over non-ignored targets; nan when all are ignored,
    as PyTorch) and "sum", [N] for "none" (0 at ignored targets). Loss in fp32 (fp64 for
    fp64 inputs); gradients flow to hidden, weight and bias in their own dtypes.

    chunk_tokens x chunk_vocab is the largest logit tile of impl="torch"; for impl="triton"
    they cap the kernel's power-of-two tile (at most 64 x 128)."""
    _check_inputs(hidden, weight, bias, targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
                  reduction=reduction, impl=impl, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    if impl == "naive":
        return naive_linear_cross_entropy(hidden, weight, bias, targets, ignore_index=ignore_index,
                                          label_smoothing=label_smoothing, reduction=reduction)
    targets = targets.long()
    rows = (targets != ignore_index).nonzero().squeeze(1)
    spec = _Spec(impl, float(label_smoothing), reduction, int(chunk_tokens), int(chunk_vocab), targets.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, rows, targets.index_select(0, rows), spec)


def naive_linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                               ignore_index: int = -100, label_smoothing: float = 0.0,
                               reduction: str = "mean") -> Tensor:
    """The textbook formula: materialises the [N, V] logits (in the input dtype, then an
    fp32 copy for the loss). The reference and the baseline of the benchmark."""
    logits = F.linear(hidden, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)


def _check_inputs(hidden, weight, bias, targets, *, ignore_index, label_smoothing, reduction, impl,
                  chunk_tokens, chunk_vocab) -> None:
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy: unknown impl {impl!r}; expected one of {IMPLS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"linear_cross_entropy: {name} must be a positive int, got {value!r}")
    if hidden.dim() != 2:
        raise ValueError(f"linear_cross_entropy: hidden must be [N, H], got shape {tuple(hidden.shape)} "
                         "(flatten [B, L, H] to [B*L, H])")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight must be [V, H] with H = hidden.shape[1] = "
                         f"{hidden.shape[1]}, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be [V] = [{weight.shape[0]}] or None, "
                         f"got shape {tuple(bias.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: targets must be [N] = [{hidden.shape[0]}] (one class index "
                         f"per row of hidden), got shape {tuple(targets.shape)}")
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"linear_cross_entropy: targets must be integer class indices, got {targets.dtype} "
                        "(class-probability targets are not supported)")
    same_dtype = weight.dtype == hidden.dtype and (bias is None or bias.dtype == hidden.dtype)
    if not hidden.is_floating_point() or not same_dtype:
        raise TypeError("linear_cross_entropy: hidden, weight and bias must share one floating dtype, got "
                        f"{hidden.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")
    devices = {t.device for t in (hidden, weight, bias, targets) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"linear_cross_entropy: all inputs must be on one device, got {sorted(map(str, devices))}")
    vocab = weight.shape[0]
    # One fused elementwise pass and one reduction over N: negligible next to the projection.
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bad.any():
        first = targets[bad][0].item()
        raise IndexError(f"linear_cross_entropy: target {first} is out of range for a vocabulary of {vocab} "
                         f"(and is not ignore_index={ignore_index})")


@dataclass(frozen=True)
class _Spec:
    impl: str
    eps: float
    reduction: str
    chunk_tokens: int
    chunk_vocab: int
    n_total: int


def _backend(impl: str):
    if impl == "triton":
        from vlm.kernels import linear_ce_triton  # imports triton: only when asked for
        return linear_ce_triton.forward, linear_ce_triton.backward
    return torch_forward, torch_backward


class _LinearCrossEntropy(torch.autograd.Function):
    """Saves the inputs (not copies) and the per-token log-sum-exp: O(N) floats besides."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, tgt, spec: _Spec):
        fwd, _ = _backend(spec.impl)
        loss_rows, lse = fwd(hidden, weight, bias, rows, tgt, spec.eps, spec.chunk_tokens, spec.chunk_vocab)
        ctx.save_for_backward(hidden, weight, bias, rows, tgt, lse)
        ctx.spec = spec
        if spec.reduction == "none":
            return loss_rows.new_zeros(spec.n_total).index_copy_(0, rows, loss_rows)
        total = loss_rows.sum()
        return total / rows.numel() if spec.reduction == "mean" else total  # 0 / 0 = nan, as PyTorch

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, rows, tgt, lse = ctx.saved_tensors
        spec = ctx.spec
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs):
            return None, None, None, None, None, None
        grad_out = grad_out.to(lse.dtype)
        if spec.reduction == "none":
            scale = grad_out.index_select(0, rows)
        elif spec.reduction == "mean":
            scale = (grad_out / max(rows.numel(), 1)).expand(rows.numel()).contiguous()
        else:
            scale = grad_out.expand(rows.numel()).contiguous()
        _, bwd = _backend(spec.impl)
        dh, dw, db = bwd(hidden, weight, bias, rows, tgt, lse, scale, spec.eps, needs,
                         spec.chunk_tokens, spec.chunk_vocab)
        return dh, dw, db, None, None, None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, v0: int, v1: int) -> Tensor:
    """h [T, H] (accumulation dtype) -> logits [T, v1 - v0] of the vocabulary chunk."""
    w = weight[v0:v1].to(h.dtype)
    if bias is None:
        return h @ w.T
    return torch.addmm(bias[v0:v1].to(h.dtype), h, w.T)


def torch_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, tgt: Tensor, eps: float,
                  chunk_tokens: int, chunk_vocab: int) -> tuple[Tensor, Tensor]:
    """rows [M] (the non-ignored rows of hidden), tgt [M] their targets -> (loss [M], lse [M])
    in the accumulation dtype; one chunk_tokens x chunk_vocab tile at a time."""
    acc = _acc_dtype(hidden.dtype)
    vocab = weight.shape[0]
    lse = torch.empty(rows.numel(), dtype=acc, device=hidden.device)
    loss = torch.empty_like(lse)
    for s in range(0, rows.numel(), chunk_tokens):
        r, t = rows[s:s + chunk_tokens], tgt[s:s + chunk_tokens]
        h = hidden.index_select(0, r).to(acc)
        run_max = torch.full((r.numel(),), float("-inf"), dtype=acc, device=h.device)
        run_sum = torch.zeros_like(run_max)
        target_logit = torch.zeros_like(run_max)
        logit_sum = torch.zeros_like(run_max)
        for v0 in range(0, vocab, chunk_vocab):
            v1 = min(v0 + chunk_vocab, vocab)
            z = _logits(h, weight, bias, v0, v1)
            inside = (t >= v0) & (t < v1)
            picked = z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            target_logit = torch.where(inside, picked, target_logit)
            if eps:
                logit_sum += z.sum(1)
            new_max = torch.maximum(run_max, z.amax(1))
            run_sum = run_sum * torch.exp(run_max - new_max) + z.sub_(new_max[:, None]).exp_().sum(1)
            run_max = new_max
        tile_lse = run_max + run_sum.log()
        lse[s:s + r.numel()] = tile_lse
        loss[s:s + r.numel()] = tile_lse - (1.0 - eps) * target_logit - (eps / vocab) * logit_sum
    return loss, lse


def torch_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, tgt: Tensor, lse: Tensor,
                   scale: Tensor, eps: float, needs: tuple[bool, bool, bool], chunk_tokens: int,
                   chunk_vocab: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """scale [M]: dLoss/dloss_row of each kept row -> (d_hidden [N, H], d_weight [V, H],
    d_bias [V]) in the inputs' dtypes, None where not needed. d_weight and d_bias are summed
    over token chunks in the accumulation dtype; d_hidden is final per token chunk."""
    acc = _acc_dtype(hidden.dtype)
    vocab, dev = weight.shape[0], hidden.device
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    dh = torch.zeros_like(hidden) if need_h else None
    dw = torch.zeros(weight.shape, dtype=acc, device=dev) if need_w else None
    db = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None
    for s in range(0, rows.numel(), chunk_tokens):
        r, t = rows[s:s + chunk_tokens], tgt[s:s + chunk_tokens]
        l, g = lse[s:s + chunk_tokens], scale[s:s + chunk_tokens]
        h = hidden.index_select(0, r).to(acc)
        dh_tile = torch.zeros_like(h) if need_h else None
        for v0 in range(0, vocab, chunk_vocab):
            v1 = min(v0 + chunk_vocab, vocab)
            grad = _logits(h, weight, bias, v0, v1).sub_(l[:, None]).exp_()  # softmax
            if eps:
                grad.sub_(eps / vocab)
            inside = (t >= v0) & (t < v1)
            hit = inside.to(acc).mul_(eps - 1.0)
            grad.scatter_add_(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None], hit[:, None])
            grad.mul_(g[:, None])
            if need_h:
                dh_tile.addmm_(grad, weight[v0:v1].to(acc))
            if need_w:
                dw[v0:v1].addmm_(grad.T, h)
            if need_b:
                db[v0:v1] += grad.sum(0)
        if need_h:
            dh.index_copy_(0, r, dh_tile.to(hidden.dtype))
    return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype))
