"""Triton kernels of the fused linear + cross-entropy of `linear_ce`.

Same algorithm, same launcher signatures as its torch_forward / torch_backward.

Three kernels, all over the non-ignored rows only (the launcher compacts them into `rows`):

* `_forward_kernel`, one program per BLOCK_N tokens: walks the vocabulary in BLOCK_V
  chunks, each tile's logits summed over BLOCK_H slices of H with tl.dot; online
  log-sum-exp, target logit and (for smoothing) the sum of logits; writes lse and loss.
* `_d_hidden_kernel`, one program per BLOCK_N tokens: recomputes the tiles of its tokens
  and adds grad_tile @ W_chunk into its own rows of an fp32 d_hidden buffer.
* `_d_weight_kernel`, one program per BLOCK_V vocabulary entries: recomputes the tiles of
  its vocabulary chunk over all tokens, adds grad_tile^T @ H_block into its own rows of an
  fp32 d_weight buffer and sums d_bias in registers.

Two backward kernels instead of one with atomics: every output element has exactly one
writing program, so there are no atomics and the result is deterministic; the price is
recomputing the logits twice in backward (5 projections' worth of FLOPs per step instead
of 4). Each program read-modify-writes only its own rows of the fp32 buffers, with the
same pointer tensor for the load and the store.

Precision: operands of tl.dot in the input dtype, accumulation in fp32; fp32 inputs use
IEEE fp32 products unless torch.backends.cuda.matmul.allow_tf32 is set (as torch's own
matmul). The logit gradient is rounded to the input dtype before its two products (as
autograd does for bf16 logits). Triton 3.8's interpreter multiplies bf16 operands of
tl.dot as raw uint16 bits, so under TRITON_INTERPRET=1 bf16 operands are widened to fp32
first (the values are the same bf16 numbers; only the product is exact)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_BLOCK_N, MAX_BLOCK_V, MAX_BLOCK_H = 64, 128, 64
MIN_BLOCK = 16  # tl.dot's smallest M, N, K on NVIDIA


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, mask_n, offs_v, mask_v, H, stride_hn, stride_hh, stride_wv, stride_wh,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """-> fp32 [BLOCK_N, BLOCK_V] logits of the given rows and vocabulary entries."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        offs_h = k0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_h[None, :] * stride_hh,
                    mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[None, :] * stride_wv + offs_h[:, None] * stride_wh,
                    mask=mask_v[None, :] & mask_h[:, None], other=0.0)  # [BLOCK_H, BLOCK_V]
        acc = _dot(h, w, acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _grad_tile(z, lse, scale, tgt, offs_v, mask_n, mask_v, eps, inv_vocab):
    """Logit gradient (softmax - (1 - eps) onehot - eps / V) * scale, 0 outside the tile."""
    p = tl.exp(z - lse[:, None])
    hit = offs_v[None, :] == tgt[:, None]
    grad = (p - eps * inv_vocab - tl.where(hit, 1.0 - eps, 0.0)) * scale[:, None]
    return tl.where(mask_n[:, None] & mask_v[None, :], grad, 0.0)


@triton.jit
def _forward_kernel(h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, lse_ptr, loss_ptr, n_rows, V, H,
                    stride_hn, stride_hh, stride_wv, stride_wh, eps, inv_vocab,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0)
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0)
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, mask_n, offs_v, mask_v, H, stride_hn, stride_hh, stride_wv,
                        stride_wh, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        target_logit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        logit_sum += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))  # finite: every chunk has a real column
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    loss = lse - (1.0 - eps) * target_logit - eps * inv_vocab * logit_sum
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(loss_ptr + offs_n, loss, mask=mask_n)


@triton.jit
def _d_hidden_kernel(h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, lse_ptr, scale_ptr, dh_ptr, n_rows, V, H,
                     stride_hn, stride_hh, stride_wv, stride_wh, eps, inv_vocab,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dh_ptr: fp32 [n_rows, H] contiguous, zeroed; row i is rows[i]'s gradient."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0)
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, mask_n, offs_v, mask_v, H, stride_hn, stride_hh, stride_wv,
                        stride_wh, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        grad = _grad_tile(z, lse, scale, tgt, offs_v, mask_n, mask_v, eps, inv_vocab).to(w_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_H):
            offs_h = k0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_h[None, :] * stride_wh,
                        mask=mask_v[:, None] & mask_h[None, :], other=0.0)  # [BLOCK_V, BLOCK_H]
            out = dh_ptr + offs_n.to(tl.int64)[:, None] * H + offs_h[None, :]
            mask_out = mask_n[:, None] & mask_h[None, :]
            acc = tl.load(out, mask=mask_out, other=0.0)
            tl.store(out, _dot(grad, w, acc, UPCAST, PRECISION), mask=mask_out)


@triton.jit
def _d_weight_kernel(h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, lse_ptr, scale_ptr, dw_ptr, db_ptr, n_rows, V, H,
                     stride_hn, stride_hh, stride_wv, stride_wh, eps, inv_vocab,
                     HAS_BIAS: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dw_ptr: fp32 [V, H] contiguous, zeroed; db_ptr: fp32 [V]."""
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    mask_v = offs_v < V
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0)
        tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, mask_n, offs_v, mask_v, H, stride_hn, stride_hh, stride_wv,
                        stride_wh, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        grad = _grad_tile(z, lse, scale, tgt, offs_v, mask_n, mask_v, eps, inv_vocab)
        if NEED_B:
            db += tl.sum(grad, axis=0)
        if NEED_W:
            grad_t = tl.trans(grad.to(h_ptr.dtype.element_ty))  # [BLOCK_V, BLOCK_N]
            for k0 in range(0, H, BLOCK_H):
                offs_h = k0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_h[None, :] * stride_hh,
                            mask=mask_n[:, None] & mask_h[None, :], other=0.0)
                out = dw_ptr + offs_v[:, None] * H + offs_h[None, :]
                mask_out = mask_v[:, None] & mask_h[None, :]
                acc = tl.load(out, mask=mask_out, other=0.0)
                tl.store(out, _dot(grad_t, h, acc, UPCAST, PRECISION), mask=mask_out)
    if NEED_B:
        tl.store(db_ptr + offs_v, db, mask=mask_v)


def _pow2_tile(chunk: int, cap: int) -> int:
    """Largest power of two <= chunk, within [MIN_BLOCK, cap]."""
    return max(MIN_BLOCK, min(cap, 1 << (max(chunk, 1).bit_length() - 1)))


def _launch_args(hidden: Tensor, weight: Tensor, chunk_tokens: int, chunk_vocab: int) -> dict:
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"linear_cross_entropy(impl='triton') supports float32, bfloat16 and float16, got "
                        f"{hidden.dtype}; use impl='torch'")
    if not INTERPRET and hidden.device.type != "cuda":
        raise ValueError("linear_cross_entropy(impl='triton') needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         f"triton is imported, for CPU tensors), got device {hidden.device}")
    fp32_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    block_h = max(MIN_BLOCK, min(MAX_BLOCK_H, triton.next_power_of_2(hidden.shape[1])))
    return dict(BLOCK_N=_pow2_tile(chunk_tokens, MAX_BLOCK_N), BLOCK_V=_pow2_tile(chunk_vocab, MAX_BLOCK_V),
                BLOCK_H=block_h, UPCAST=INTERPRET and hidden.dtype == torch.bfloat16,
                PRECISION=fp32_precision if hidden.dtype == torch.float32 else "tf32")


def forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, tgt: Tensor, eps: float,
            chunk_tokens: int, chunk_vocab: int) -> tuple[Tensor, Tensor]:
    """Same contract as linear_ce.torch_forward: -> (loss [M], lse [M]) fp32."""
    meta = _launch_args(hidden, weight, chunk_tokens, chunk_vocab)
    n_rows, (vocab, width) = rows.numel(), weight.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    loss = torch.empty_like(lse)
    if n_rows:
        grid = (triton.cdiv(n_rows, meta["BLOCK_N"]),)
        _forward_kernel[grid](hidden, weight, weight if bias is None else bias, rows, tgt, lse, loss, n_rows, vocab,
                              width, *hidden.stride(), *weight.stride(), eps, 1.0 / vocab, HAS_BIAS=bias is not None,
                              **meta)
    return loss, lse


def backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, tgt: Tensor, lse: Tensor,
             scale: Tensor, eps: float, needs: tuple[bool, bool, bool], chunk_tokens: int,
             chunk_vocab: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Same contract as linear_ce.torch_backward."""
    meta = _launch_args(hidden, weight, chunk_tokens, chunk_vocab)
    n_rows, (vocab, width) = rows.numel(), weight.shape
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    dev, f32 = hidden.device, torch.float32
    scale = scale.to(f32).contiguous()
    common = (hidden, weight, weight if bias is None else bias, rows, tgt, lse, scale)
    dh = torch.zeros_like(hidden) if need_h else None
    if need_h and n_rows:
        dh_rows = torch.zeros(n_rows, width, dtype=f32, device=dev)
        _d_hidden_kernel[(triton.cdiv(n_rows, meta["BLOCK_N"]),)](
            *common, dh_rows, n_rows, vocab, width, *hidden.stride(), *weight.stride(), eps, 1.0 / vocab,
            HAS_BIAS=bias is not None, **meta)
        dh.index_copy_(0, rows, dh_rows.to(hidden.dtype))
    dw = torch.zeros(vocab, width, dtype=f32, device=dev) if need_w else None
    db = torch.zeros(vocab, dtype=f32, device=dev) if need_b else None
    if (need_w or need_b) and n_rows:
        _d_weight_kernel[(triton.cdiv(vocab, meta["BLOCK_V"]),)](
            *common, lse if dw is None else dw, lse if db is None else db, n_rows, vocab, width, *hidden.stride(),
            *weight.stride(), eps, 1.0 / vocab, HAS_BIAS=bias is not None, NEED_W=need_w, NEED_B=need_b, **meta)
    return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype))
