"""Tiled image–text contrastive loss (InfoNCE/UniCL, SigLIP) that never holds the b x B logits.

Softmax (InfoNCE, UniCL) and sigmoid (SigLIP) kinds; the b x B logit matrix is never
materialised.

    loss = contrastive_loss(image, text, scale, kind="softmax", labels=labels)  # [b, D], [b, D], [1]

Local image rows X [b, D] are scored against every rank's text columns Y [B, D] in tiles
S = scale * X_r Y_c^T (+ bias) of block_rows x block_cols. One pass over the tiles (forward)
keeps, per image row, the online log-sum-exp and the sum of positive logits (image->text)
and, per text column, the same partial statistics over this rank's image rows
(text->image); the column statistics of all ranks are combined with all_reduce (max, then
sum of exp(shift)). Backward makes one more pass that recomputes each tile once and forms
dS for both directions at once. Only O(B) statistics are saved, no tile.

The columns are exchanged in chunks, not gathered: each rank's b text rows are broadcast
by their owner in turn (at most COLUMN_CHUNK columns per tile pass), the row statistics
are merged online across chunks, and in backward the chunk's column gradient is summed
onto its owner (reduce). A rank holds its inputs, one chunk of b x D columns and O(B)
statistics; never B x D, b x B or B x B.

Positives P(i) of image row i: every column with the same label >= 0, and always its own
pair (global column i). The counts |P(i)| depend only on the labels, so they come from
them (`positive_counts`, O(B log B)) rather than from the tile pass.

Distributed conventions, as in vlm.objectives (every rank holds b rows, B = W*b):
- each rank returns a loss whose mean over ranks is the loss of the global batch;
- the gradient reaching this rank's image/text rows is the gradient of sum_r g_r loss_r
  (g_r: the upstream gradient of rank r, all-gathered in backward), i.e. W times the global
  gradient when every g_r = 1 — what vlm.distributed.gather_features yields today;
- scale/bias: each rank returns the part of d(sum_r g_r loss_r) that its tiles (its image
  rows x all columns) carry, so their mean over ranks is the global gradient. (With
  gather_features every rank's own loss would be differentiated instead; the sum over
  ranks is the same, the split differs.)

`impl` picks the local tile work: "torch" (plain-torch loops, any device,
vlm/kernels/contrastive_torch.py), "triton" (the same tile algorithm as Triton kernels,
vlm/kernels/contrastive_triton.py, imported on first use) or "naive" (the textbook formula
on the full logits: the reference and the baseline).

Accumulation is fp32 (bf16/fp16/fp32 inputs), or fp64 for fp64 inputs, where "torch" and
"naive" compute everything (tiles, log-sum-exp, gradients) in fp64 as OpenCLIP's losses
do; the Triton kernels accumulate in fp32 only and refuse fp64."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from vlm.distributed import gather_features, gather_labels, world
from vlm.kernels.contrastive_torch import TorchTiles

KINDS = ("softmax", "sigmoid")
IMPLS = ("torch", "triton", "naive")
# Tuned on 2 CPU cores at D=512 fp32 (benchmarks/loss_memory.py): a tile costs ~20 torch
# ops, each a parallel region, so on CPU tiles must be large for the GEMMs and the
# elementwise passes to amortise it (256 x 256 ran 3x slower than naive); 1024 x 1024 fp32
# (4 MiB, about four alive at once) stays inside 16 KB a sample from B = 4096 up.
TORCH_BLOCKS = (1024, 1024)
# GPU tiles: 64 x 64 fp32 accumulators fit the registers of one program.
TRITON_BLOCKS = (64, 64)
# Columns are visited in chunks of at most this many: one rank's text rows at a time
# (broadcast by their owner: a chunked all-gather, so no rank ever holds all B x D columns)
# and, within them, at most this many per tile pass (which bounds the Triton launcher's
# per-program column buffers at programs x COLUMN_CHUNK floats).
COLUMN_CHUNK = 65536


def contrastive_loss(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None = None, *,
                     kind: Literal["softmax", "sigmoid"] = "softmax", labels: Tensor | None = None,
                     impl: Literal["torch", "triton", "naive"] = "torch",
                     block_rows: int | None = None, block_cols: int | None = None) -> Tensor:
    """Loss of this rank, a scalar in the accumulation dtype: fp32, or fp64 when image and
    text are fp64. image, text: [b, D] local rows (fp32/bf16/fp16, or fp64 with impl "torch"
    or "naive", which then compute in fp64 throughout; "triton" refuses fp64);
    scale: [1] logit multiplier (1/T, already exp'd); bias: [1] (sigmoid only);
    labels: [b] int64, -1 = unlabelled. block_rows/block_cols: tile shape, None = the
    impl's default (TORCH_BLOCKS, TRITON_BLOCKS; naive ignores them).

    softmax: 0.5 * (mean_i -(1/|P(i)|) sum_{k in P(i)} log softmax_k(S_i.) + the same for
    text rows against all images) — clip_infonce without labels, unicl with them.
    sigmoid: sum_{i local, j all} -log sigmoid(z_ij S_ij) / b, z = +1 on positives — siglip."""
    _check(image, text, scale, bias, kind, labels, impl, block_rows, block_cols)
    if impl == "naive":
        return naive_contrastive_loss(image, text, scale, bias, kind=kind, labels=labels)
    default = TORCH_BLOCKS if impl == "torch" else TRITON_BLOCKS
    blocks = (block_rows or default[0], block_cols or default[1])
    return _TiledContrastive.apply(image, text, scale, bias, labels, kind, impl, blocks)


def _check(image, text, scale, bias, kind, labels, impl, block_rows, block_cols) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, x in (("image", image), ("text", text)):
        if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must be [b, D] with b, D >= 1, got {tuple(x.shape)}")
        if x.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name} must be float64, float32, bfloat16 or float16, got {x.dtype}")
        if x.dtype == torch.float64 and impl == "triton":
            raise ValueError(f"impl='triton' accumulates in float32 and takes float32, bfloat16 or float16, "
                             f"got {name} {x.dtype}: use impl='torch' (or 'naive') for float64")
    if image.shape != text.shape:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must have the same shape")
    if image.dtype != text.dtype or image.device != text.device:
        raise ValueError(f"image and text must share dtype and device, got {image.dtype}/{image.device} "
                         f"and {text.dtype}/{text.device}")
    if not isinstance(scale, Tensor) or scale.numel() != 1:
        raise ValueError("scale must be a 1-element tensor")
    if kind == "sigmoid" and (not isinstance(bias, Tensor) or bias.numel() != 1):
        raise ValueError("kind='sigmoid' needs bias, a 1-element tensor")
    if kind == "softmax" and bias is not None:
        raise ValueError("kind='softmax' takes no bias (pass bias=None)")
    if labels is not None:
        if labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64, got {labels.dtype}")
        if labels.shape != (image.shape[0],):
            raise ValueError(f"labels must be [b] = [{image.shape[0]}], got {tuple(labels.shape)}")
    for name, n in (("block_rows", block_rows), ("block_cols", block_cols)):
        if n is not None and (not isinstance(n, int) or n <= 0):
            raise ValueError(f"{name} must be a positive int, got {n!r}")


def positive_counts(all_labels: Tensor | None, n: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """|P(i)| for the n global rows, [n] in dtype: the rows sharing a label >= 0, else 1 (own pair)."""
    if all_labels is None:
        return torch.ones(n, device=device, dtype=dtype)
    _, inverse, counts = torch.unique(all_labels, return_inverse=True, return_counts=True)
    return torch.where(all_labels >= 0, counts[inverse], 1).to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 features, else fp32 (bf16/fp16 tiles are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- naive

def naive_contrastive_loss(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None = None, *,
                           kind: str = "softmax", labels: Tensor | None = None) -> Tensor:
    """The textbook formula on the full [b, B] logits (fp32, fp64 for fp64 features),
    distributed through gather_features like vlm.objectives. On one process the text->image
    logits are the transpose of the same matrix (one GEMM, as a fair baseline)."""
    rank, size = world()
    b = image.shape[0]
    acc = accumulation_dtype(image.dtype)
    all_text = gather_features(text).to(acc)
    all_labels = gather_labels(labels) if labels is not None else None
    scale = scale.to(acc).reshape(())
    logits = scale * image.to(acc) @ all_text.T
    cols = torch.arange(b, device=image.device) + rank * b
    local = torch.arange(b, device=image.device)
    if labels is None:
        positive = None
    else:
        positive = (labels[:, None] == all_labels[None, :]) & (labels[:, None] >= 0)
        positive[local, cols] = True
    if kind == "sigmoid":
        logits = logits + bias.to(acc).reshape(())
        signs = -torch.ones_like(logits)
        signs[local, cols] = 1.0
        if positive is not None:
            signs[positive] = 1.0
        return -F.logsigmoid(signs * logits).sum() / b
    logits_t2i = logits.T if size == 1 else scale * text.to(acc) @ gather_features(image).to(acc).T
    if positive is None:
        return 0.5 * (F.cross_entropy(logits, cols) + F.cross_entropy(logits_t2i, cols))
    weights = positive.to(acc) / positive.sum(dim=1, keepdim=True)
    loss_i2t = -(weights * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t2i = -(weights * F.log_softmax(logits_t2i, dim=1)).sum(1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


# ------------------------------------------------------------- distributed wrapper

class _TiledContrastive(torch.autograd.Function):
    """The collectives and the per-rank loss; the tile passes come from `_tile_ops(impl)`."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, labels, kind, impl, blocks):
        rank, size = world()
        b = image.shape[0]
        all_labels = _all_gather(labels) if labels is not None else None
        acc = accumulation_dtype(image.dtype)
        counts = positive_counts(all_labels, size * b, image.device, acc)
        ops = _tile_ops(impl)
        # the tile passes accumulate in scale's dtype
        scale_acc = scale.detach().to(acc).reshape(1)
        bias_acc = bias.detach().to(acc).reshape(1) if bias is not None else None
        offset = rank * b
        own = slice(offset, offset + b)
        if kind == "sigmoid":
            row_loss = torch.zeros(b, device=image.device, dtype=acc)
            for c0, c1, y in _column_chunks(text):
                lab = all_labels[c0:c1] if labels is not None else None
                row_loss += ops.sigmoid_forward(image, y, scale_acc, bias_acc, labels, lab, offset - c0, blocks)
            loss = row_loss.sum() / b
            saved = ()
        else:
            like = dict(device=image.device, dtype=acc)
            row_max, row_sum, row_pos = torch.full((b,), -math.inf, **like), *(torch.zeros(b, **like) for _ in range(2))
            col_max, col_sum, col_pos = (torch.empty(size * b, **like) for _ in range(3))
            for c0, c1, y in _column_chunks(text):
                lab = all_labels[c0:c1] if labels is not None else None
                m, s, p, col_max[c0:c1], col_sum[c0:c1], col_pos[c0:c1] = ops.softmax_forward(
                    image, y, scale_acc, labels, lab, offset - c0, blocks)
                top = torch.maximum(row_max, m)
                row_sum = row_sum * (row_max - top).exp() + s * (m - top).exp()
                row_max, row_pos = top, row_pos + p
            if size > 1:
                col_max, col_sum, col_pos = _combine_columns(col_max, col_sum, col_pos)
            # lse - mean positive logit, with the shift subtracted first: at |S| ~ 1000 a
            # rounded lse alone would be off by ~1e-4
            loss_i2t = (row_max - row_pos / counts[own] + row_sum.log()).sum()
            loss_t2i = (col_max[own] - col_pos[own] / counts[own] + col_sum[own].log()).sum()
            loss = 0.5 * (loss_i2t + loss_t2i) / b
            saved = (row_max, row_sum, col_max, col_sum)
        ctx.save_for_backward(image, text, scale_acc, bias_acc, labels, all_labels, counts, *saved)
        ctx.kind, ctx.impl, ctx.blocks, ctx.offset, ctx.size = kind, impl, blocks, offset, size
        ctx.params = (scale.dtype, scale.shape), (bias.dtype, bias.shape) if bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, text, scale_acc, bias_acc, labels, all_labels, counts, *saved = ctx.saved_tensors
        b, size, offset = image.shape[0], ctx.size, ctx.offset
        ops = _tile_ops(ctx.impl)
        g = grad.to(scale_acc.dtype).reshape(1)
        like = dict(device=image.device, dtype=scale_acc.dtype)
        dx, dscale = torch.zeros(image.shape, **like), torch.zeros(1, **like)
        dy = torch.zeros(text.shape, **like)  # this rank's text rows, summed from every rank
        if ctx.kind == "sigmoid":
            dbias = torch.zeros(1, **like)
            for c0, c1, y in _column_chunks(text):
                lab = all_labels[c0:c1] if labels is not None else None
                gx, gy, gs, gb = ops.sigmoid_backward(image, y, scale_acc, bias_acc, labels, lab, offset - c0,
                                                      ctx.blocks, g / b)
                dx += gx
                dscale += gs
                dbias += gb
                _sum_to_owner(gy, c0, b, dy)
        else:
            row_max, row_sum, col_max, col_sum = saved
            # a column's t2i term belongs to the rank that owns that text row, so it is
            # weighed by that rank's upstream gradient (they usually agree)
            g_all = _all_gather(g) if size > 1 else g
            row_coef = 0.5 * g / b
            col_coef = (0.5 / b) * g_all.repeat_interleave(b)
            # softmax = exp(S - max) / sum: the factors coef / sum and coef / |P| per row and column
            row = (row_max, row_coef / row_sum, row_coef / counts[offset:offset + b])
            col = (col_max, col_coef / col_sum, col_coef / counts)
            for c0, c1, y in _column_chunks(text):
                lab = all_labels[c0:c1] if labels is not None else None
                gx, gy, gs = ops.softmax_backward(image, y, scale_acc, labels, lab, offset - c0, ctx.blocks, row,
                                                  tuple(v[c0:c1] for v in col))
                dx += gx
                dscale += gs
                _sum_to_owner(gy, c0, b, dy)
            dbias = None
        (scale_dtype, scale_shape), bias_meta = ctx.params
        if dbias is not None:
            dbias = dbias.to(bias_meta[0]).reshape(bias_meta[1])
        return (dx.to(image.dtype), dy.to(image.dtype), dscale.to(scale_dtype).reshape(scale_shape), dbias,
                None, None, None, None)


def _all_gather(x: Tensor) -> Tensor:
    """[b, ...] -> [W*b, ...] rank-major, no gradient; x itself on one process."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _column_chunks(text: Tensor):
    """(c0, c1, Y[c0:c1]) over the global columns, every rank in the same order: each rank's
    b text rows broadcast by their owner, in pieces of at most COLUMN_CHUNK. Collective."""
    rank, size = world()
    b = text.shape[0]
    for owner in range(size):
        block = text.contiguous() if owner == rank else torch.empty_like(text)
        if size > 1:
            dist.broadcast(block, src=owner)
        for s0 in range(0, b, COLUMN_CHUNK):
            s1 = min(s0 + COLUMN_CHUNK, b)
            yield owner * b + s0, owner * b + s1, block[s0:s1]


def _sum_to_owner(gy: Tensor, c0: int, b: int, dy: Tensor) -> None:
    """Adds every rank's gradient of global columns [c0, c0 + len(gy)) onto the rank that
    owns them (their text rows), into its dy [b, D]. Collective."""
    rank, size = world()
    owner, s0 = divmod(c0, b)
    if size > 1:
        dist.reduce(gy, dst=owner)
    if owner == rank:
        dy[s0:s0 + gy.shape[0]] += gy


def _combine_columns(col_max: Tensor, col_sum: Tensor, col_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Partial column statistics over this rank's image rows -> over all image rows."""
    global_max = col_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX)
    sums = torch.stack([col_sum * (col_max - global_max).exp(), col_pos])
    dist.all_reduce(sums)
    return global_max, sums[0], sums[1]


def _tile_ops(impl: str):
    if impl == "triton":
        from vlm.kernels import contrastive_triton  # imports triton: only when asked for
        return contrastive_triton
    return TorchTiles
