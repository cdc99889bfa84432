"""Fused linear + cross-entropy against a float64 F.cross_entropy, value and gradients.

impl="torch" over odd shapes and every option; impl="triton" through the Triton
interpreter (TRITON_INTERPRET=1, set in conftest) on a smaller subset, since the
interpreter runs each program instance in Python."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vlm.kernels.linear_ce import linear_cross_entropy

TOL = {torch.float32: dict(rtol=1e-5, atol_scale=1e-5), torch.bfloat16: dict(rtol=5e-2, atol=5e-3),
       torch.float16: dict(rtol=5e-2, atol=5e-3)}


def make_inputs(n, v, h, *, dtype=torch.float32, bias=True, ignore="some", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * h ** -0.5 * 3).to(dtype)  # logits of order 3: a peaked softmax
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    targets = torch.randint(v, (n,), generator=g)
    if ignore == "some":
        targets[::3] = -100
    elif ignore == "all":
        targets[:] = -100
    return hidden, weight, b, targets


def loss_and_grads(fn, hidden, weight, bias, targets, *, reduction, seed=1, **kw):
    """-> (loss, d_hidden, d_weight, d_bias) under a non-uniform upstream gradient for "none"."""
    leaves = [x.detach().requires_grad_() for x in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None, targets, reduction=reduction, **kw)
    if reduction == "none":
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    else:
        upstream = torch.tensor(1.7, dtype=torch.float64)
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
    return (loss, *grads, *(() if bias is not None else (None,)))


def reference(hidden, weight, bias, targets, *, reduction, ignore_index=-100, label_smoothing=0.0):
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    return F.cross_entropy(logits, targets, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def check(n, v, h, *, impl, dtype=torch.float32, bias=True, ignore="some", reduction="mean", eps=0.0,
          chunks=(16, 100)):
    hidden, weight, b, targets = make_inputs(n, v, h, dtype=dtype, bias=bias, ignore=ignore)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, b, targets, reduction=reduction, impl=impl,
                         label_smoothing=eps, chunk_tokens=chunks[0], chunk_vocab=chunks[1])
    want = loss_and_grads(reference, hidden.double(), weight.double(), None if b is None else b.double(), targets,
                          reduction=reduction, label_smoothing=eps)
    assert got[0].dtype == torch.float32
    for name, x, ref, like in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want, (None, hidden, weight, b)):
        if ref is None:
            assert x is None
            continue
        if like is not None:
            assert x.dtype == like.dtype, name
        tol = TOL[dtype]
        atol = tol["atol_scale"] * float(ref.detach().abs().max()) if "atol_scale" in tol else tol["atol"]
        torch.testing.assert_close(x.double(), ref, rtol=tol["rtol"], atol=atol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("n,v,h", list(itertools.product((1, 7, 70), (3, 257, 1000), (3, 64, 130))))
def test_torch_odd_shapes(n, v, h):
    check(n, v, h, impl="torch", eps=0.1, ignore="some" if n > 1 else "none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunks", [(16, 100), (9, 37), (1000, 5000)])
def test_torch_options(reduction, eps, bias, chunks):
    check(70, 257, 64, impl="torch", reduction=reduction, eps=eps, bias=bias, chunks=chunks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_half_precision(dtype, reduction):
    check(70, 1000, 130, impl="torch", dtype=dtype, reduction=reduction, eps=0.1)


@pytest.mark.parametrize("impl", ["torch", "naive", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_matches_pytorch(impl, reduction):
    """PyTorch: "mean" over zero targets is nan, "sum" 0, "none" zeros; the gradients are 0."""
    hidden, weight, b, targets = make_inputs(5, 40, 16, ignore="all")
    loss, dh, dw, db = loss_and_grads(linear_cross_entropy, hidden, weight, b, targets, reduction=reduction,
                                      impl=impl, label_smoothing=0.1)
    want = reference(hidden, weight, b, targets, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), want, equal_nan=True)
    assert loss.isnan().all() if reduction == "mean" else not loss.any()
    assert not dh.any() and not dw.any() and not db.any()


@pytest.mark.parametrize("case", [
    dict(n=70, v=300, h=130, reduction="mean", eps=0.1, chunks=(16, 32)),
    dict(n=7, v=257, h=64, reduction="sum", bias=False, chunks=(1000, 5000)),
    dict(n=50, v=100, h=40, reduction="none", eps=0.1, chunks=(16, 32)),
    dict(n=1, v=3, h=3, reduction="mean", ignore="none", chunks=(16, 16)),
    dict(n=40, v=200, h=64, reduction="mean", eps=0.1, dtype=torch.bfloat16, chunks=(16, 32)),
    dict(n=40, v=200, h=64, reduction="none", bias=False, dtype=torch.bfloat16, chunks=(32, 64)),
    dict(n=30, v=150, h=48, reduction="sum", dtype=torch.float16, chunks=(16, 32)),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_triton_interpreter(case):
    case = dict(case)
    n, v, h = case.pop("n"), case.pop("v"), case.pop("h")
    check(n, v, h, impl="triton", **case)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("wants", [(True, False, False), (False, True, True), (False, False, True)])
def test_only_requested_gradients(impl, wants):
    """Frozen head (d_hidden only), frozen trunk (d_weight, d_bias), bias alone."""
    hidden, weight, b, targets = make_inputs(20, 50, 24)
    leaves = [x.clone().requires_grad_(w) for x, w in zip((hidden, weight, b), wants)]
    loss = linear_cross_entropy(*leaves, targets, impl=impl, chunk_tokens=16, chunk_vocab=32)
    got = torch.autograd.grad(loss, [x for x in leaves if x.requires_grad])
    ref_leaves = [x.double().requires_grad_(w) for x, w in zip((hidden, weight, b), wants)]
    want = torch.autograd.grad(reference(*ref_leaves, targets, reduction="mean"),
                               [x for x in ref_leaves if x.requires_grad])
    for x, ref in zip(got, want):
        torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-7)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor, in bytes, that any op returns (the Triton interpreter
    copies arguments as byte tensors, so bytes and not elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_never_allocates_logits(impl):
    n, v, h = 70, 1000, 32  # V*H = 32000 < N*V = 70000: a gradient of weight is not a logit tensor
    hidden, weight, b, targets = make_inputs(n, v, h)
    leaves = [x.requires_grad_() for x in (hidden, weight, b)]
    with _LargestOutput() as mode:
        loss = linear_cross_entropy(*leaves, targets, impl=impl, chunk_tokens=16, chunk_vocab=128,
                                    label_smoothing=0.1)
        loss.backward()
    assert mode.largest == v * h * 4  # fp32 d_weight; the largest tile (torch) is 16 x 128
    with _LargestOutput() as naive:
        linear_cross_entropy(*leaves, targets, impl="naive").backward()
    assert naive.largest == n * v * 4  # the probe does see a logit tensor when there is one


def test_reduction_over_flattened_batch_matches_head():
    """The use case: a [B, L, H] decoder output through an nn.Linear head, flattened."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 9, 24, generator=g)
    head = torch.nn.Linear(24, 61)
    targets = torch.randint(61, (2, 9), generator=g)
    want = F.cross_entropy(head(feats).flatten(0, 1), targets.flatten())
    got = linear_cross_entropy(feats.flatten(0, 1), head.weight, head.bias, targets.flatten(), chunk_vocab=16)
    torch.testing.assert_close(got, want)


def _call(**overrides):
    hidden, weight, b, targets = make_inputs(6, 10, 4)
    args = dict(hidden=hidden, weight=weight, bias=b, targets=targets)
    args.update({k: v for k, v in overrides.items() if k in args})
    kw = {k: v for k, v in overrides.items() if k not in args}
    return linear_cross_entropy(args["hidden"], args["weight"], args["bias"], args["targets"], **kw)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(hidden=torch.randn(2, 3, 4)), ValueError, r"hidden must be \[N, H\]"),
    (dict(weight=torch.randn(10, 5)), ValueError, r"weight must be \[V, H\] with H = .* 4"),
    (dict(bias=torch.randn(9)), ValueError, r"bias must be \[V\] = \[10\]"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, r"targets must be \[N\] = \[6\]"),
    (dict(targets=torch.zeros(6)), TypeError, r"targets must be integer class indices"),
    (dict(targets=torch.tensor([0, 1, 10, 2, 3, 4])), IndexError, r"target 10 is out of range .* 10"),
    (dict(targets=torch.tensor([0, 1, -1, 2, 3, 4])), IndexError, r"target -1 is out of range"),
    (dict(weight=torch.randn(10, 4, dtype=torch.float64)), TypeError, r"share one floating dtype"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(reduction="avg"), ValueError, r"unknown reduction 'avg'"),
    (dict(impl="cuda"), ValueError, r"unknown impl 'cuda'"),
    (dict(chunk_tokens=0), ValueError, r"chunk_tokens must be a positive int"),
    (dict(chunk_vocab=-4), ValueError, r"chunk_vocab must be a positive int"),
])
def test_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_ignore_index_may_be_a_class():
    hidden, weight, b, targets = make_inputs(12, 10, 4, ignore="none")
    got = linear_cross_entropy(hidden, weight, b, targets, ignore_index=3, chunk_vocab=4)
    torch.testing.assert_close(got.double(), reference(hidden, weight, b, targets, reduction="mean", ignore_index=3))


def test_triton_rejects_float64():
    hidden, weight, b, targets = make_inputs(6, 10, 4)
    with pytest.raises(TypeError, match=r"impl='triton'\) supports float32, bfloat16 and float16, got torch.float64"):
        linear_cross_entropy(hidden.double(), weight.double(), b.double(), targets, impl="triton")
