"""The one place where features cross ranks.

`gather_features` concatenates every rank's rows and routes gradients back to their owner:
the backward all-reduces the gradient of the gathered matrix (every rank's loss touches
every row) and keeps this rank's slice. A loss on local rows against global columns
then costs O(b·B) memory, never O(B²). Written out here rather than through
torch.distributed.nn's all_gather, which is deprecated in torch 2.13; all_gather and
all_reduce are the two collectives every backend, gloo included, supports.
`gather_labels` is the gradient-free counterpart for integer per-sample fields (UniCL's
labels); `gather_objects` gathers any picklable object (checkpoint metadata, eval shares)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """[b, D] on each rank (b equal on all ranks) -> [W*b, D], rank-major, differentiable."""
    _, size = world()
    if size == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_labels(x: torch.Tensor) -> torch.Tensor:
    """[b] on each rank (any dtype, b equal on all ranks) -> [W*b], rank-major, no gradient."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order: [obj] outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
