"""The plain-torch tile passes of the tiled contrastive loss (vlm/kernels/contrastive.py runs them).

One image-row block x text-column block tile at a time; the Triton kernels in
vlm/kernels/contrastive_triton.py implement the same passes with the same signatures."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _blocks(n: int, size: int):
    return ((start, min(start + size, n)) for start in range(0, n, size))


def _positives(labels: Tensor | None, all_labels: Tensor | None, offset: int, rows: tuple[int, int],
               cols: tuple[int, int], device: torch.device):
    """The positives of one tile: a bool [rows, cols] mask with labels, else the (row, col)
    indices of the own pairs in it (possibly empty)."""
    (r0, r1), (c0, c1) = rows, cols
    lo, hi = max(offset + r0, c0), min(offset + r1, c1)
    diag = torch.arange(lo, max(lo, hi), device=device)
    if labels is None:
        return diag - offset - r0, diag - c0
    lr = labels[r0:r1]
    mask = (lr[:, None] == all_labels[None, c0:c1]) & (lr[:, None] >= 0)
    mask[diag - offset - r0, diag - c0] = True
    return mask


def _online_lse_(m: Tensor, s: Tensor, t: Tensor, dim: int) -> None:
    """Fold tile t into the running max m and sum-exp s (relative to m) along dim."""
    new = torch.maximum(m, t.amax(dim))
    s.mul_((m - new).exp_()).add_((t - new.unsqueeze(dim)).exp_().sum(dim))
    m.copy_(new)


class TorchTiles:
    """Plain-torch tile passes. Features are upcast per tile to scale's dtype, the
    accumulation dtype (fp32, or fp64 for fp64 features), in which every statistic and
    gradient is kept; scale is folded into the image rows (xs = scale * x) so a tile is one GEMM."""

    @staticmethod
    def softmax_forward(x, y, scale, labels, all_labels, offset, blocks):
        """-> row_max, row_sum (sum exp(S - row_max)), row_pos (sum of positive logits),
        all [b], and the same partial column statistics over these rows: col_max, col_sum,
        col_pos [B]."""
        b, n = x.shape[0], y.shape[0]
        acc = dict(device=x.device, dtype=scale.dtype)
        row_max, row_sum, row_pos = torch.empty(b, **acc), torch.empty(b, **acc), torch.zeros(b, **acc)
        col_max, col_sum, col_pos = torch.full((n,), -math.inf, **acc), torch.zeros(n, **acc), torch.zeros(n, **acc)
        for r0, r1 in _blocks(b, blocks[0]):
            xs = x[r0:r1].to(scale.dtype) * scale
            m, s = torch.full((r1 - r0,), -math.inf, **acc), torch.zeros(r1 - r0, **acc)
            for c0, c1 in _blocks(n, blocks[1]):
                t = xs @ y[c0:c1].to(scale.dtype).T
                _online_lse_(m, s, t, 1)
                _online_lse_(col_max[c0:c1], col_sum[c0:c1], t, 0)
                pos = _positives(labels, all_labels, offset, (r0, r1), (c0, c1), x.device)
                if isinstance(pos, tuple):
                    vals = t[pos]
                    row_pos[r0:r1].index_add_(0, pos[0], vals)
                    col_pos[c0:c1].index_add_(0, pos[1], vals)
                else:
                    t_pos = torch.where(pos, t, 0.0)
                    row_pos[r0:r1] += t_pos.sum(1)
                    col_pos[c0:c1] += t_pos.sum(0)
            row_max[r0:r1], row_sum[r0:r1] = m, s
        return row_max, row_sum, row_pos, col_max, col_sum, col_pos

    @staticmethod
    def softmax_backward(x, y, scale, labels, all_labels, offset, blocks, row, col):
        """dS = c_i (softmax_row - pos/|P(i)|) + c_j (softmax_col - pos/|P'(j)|)
        = exp(S - max_i) f_i + exp(S - max_j) f_j - pos (w_i + w_j), with row = (max_i, f_i =
        c_i / sum_i, w_i = c_i / |P(i)|) [b] and col = (max_j, f_j, w_j) [B]
        -> dx [b, D], dy [B, D] (partial over these rows), dscale, all in scale's dtype."""
        n = y.shape[0]
        (row_max, row_f, row_w), (col_max, col_f, col_w) = row, col
        acc = dict(device=x.device, dtype=scale.dtype)
        dx, dy, dscale = torch.empty(x.shape, **acc), torch.zeros(y.shape, **acc), torch.zeros(1, **acc)
        for r0, r1 in _blocks(x.shape[0], blocks[0]):
            xr = x[r0:r1].to(scale.dtype)
            xs = xr * scale
            gx = torch.zeros_like(xr)
            for c0, c1 in _blocks(n, blocks[1]):
                yc = y[c0:c1].to(scale.dtype)
                t = xs @ yc.T
                ds = (t - row_max[r0:r1, None]).exp_().mul_(row_f[r0:r1, None])
                ds.add_(t.sub_(col_max[None, c0:c1]).exp_().mul_(col_f[None, c0:c1]))
                pos = _positives(labels, all_labels, offset, (r0, r1), (c0, c1), x.device)
                rw, cw = row_w[r0:r1], col_w[c0:c1]
                if isinstance(pos, tuple):
                    ds[pos] -= rw[pos[0]] + cw[pos[1]]
                else:
                    ds.sub_(torch.where(pos, rw[:, None] + cw[None, :], 0.0))
                gx.addmm_(ds, yc)
                dy[c0:c1].addmm_(ds.T, xs)
            dx[r0:r1] = gx * scale
            dscale += (xr * gx).sum()  # sum_ij dS_ij x_i.y_j
        return dx, dy, dscale

    @staticmethod
    def _signed(t, labels, all_labels, offset, rows, cols):
        """q = -z * S in place (z = +1 on positives), and the positives."""
        pos = _positives(labels, all_labels, offset, rows, cols, t.device)
        if isinstance(pos, tuple):
            t[pos] = -t[pos]
        else:
            t = torch.where(pos, -t, t)
        return t, pos

    @staticmethod
    def sigmoid_forward(x, y, scale, bias, labels, all_labels, offset, blocks):
        """-> row_loss [b] = sum_j -log sigmoid(z_ij S_ij) = sum_j softplus(-z_ij S_ij)."""
        row_loss = torch.zeros(x.shape[0], device=x.device, dtype=scale.dtype)
        for r0, r1 in _blocks(x.shape[0], blocks[0]):
            xs = x[r0:r1].to(scale.dtype) * scale
            for c0, c1 in _blocks(y.shape[0], blocks[1]):
                t = torch.addmm(bias, xs, y[c0:c1].to(scale.dtype).T)
                q, _ = TorchTiles._signed(t, labels, all_labels, offset, (r0, r1), (c0, c1))
                row_loss[r0:r1] -= F.logsigmoid(q.neg_()).sum(1)
        return row_loss

    @staticmethod
    def sigmoid_backward(x, y, scale, bias, labels, all_labels, offset, blocks, coef):
        """dS = coef * (-z) sigmoid(-z S) -> dx [b, D], dy [B, D] (partial), dscale, dbias."""
        acc = dict(device=x.device, dtype=scale.dtype)
        dx, dy = torch.empty(x.shape, **acc), torch.zeros(y.shape, **acc)
        dscale, dbias = torch.zeros(1, **acc), torch.zeros(1, **acc)
        for r0, r1 in _blocks(x.shape[0], blocks[0]):
            xr = x[r0:r1].to(scale.dtype)
            xs = xr * scale
            gx = torch.zeros_like(xr)
            for c0, c1 in _blocks(y.shape[0], blocks[1]):
                yc = y[c0:c1].to(scale.dtype)
                t = torch.addmm(bias, xs, yc.T)
                q, pos = TorchTiles._signed(t, labels, all_labels, offset, (r0, r1), (c0, c1))
                ds = q.sigmoid_().mul_(coef)
                if isinstance(pos, tuple):
                    ds[pos] = -ds[pos]
                else:
                    ds = torch.where(pos, -ds, ds)
                dbias += ds.sum()
                gx.addmm_(ds, yc)
                dy[c0:c1].addmm_(ds.T, xs)
            dx[r0:r1] = gx * scale
            dscale += (xr * gx).sum()
        return dx, dy, dscale, dbias
