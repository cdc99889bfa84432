"""The tiled contrastive losses against OpenCLIP's own ClipLoss and SigLipLoss.

Users who move between the two stacks expect the same objective, so the comparison uses
OpenCLIP's loss.py itself (loaded from its installed file, see tests/support/openclip.py),
on one process, with tiles small enough (32 x 32) that batches of 1 and 7 rows fill one
partial tile and 130 rows span five, the last partial. Both sides take the same exp'd logit multiplier
(OpenCLIP's ``logit_scale`` is ``model.logit_scale.exp()``, our ``scale`` too).

Tolerances:
- fp32 loss: 1e-6, relative once the loss exceeds 1 — float32 values near L are about
  L * 2**-23 apart, so two sums of the same terms in different orders differ by an ulp or
  two, which exceeds 1e-6 absolute once L passes 8 to 16 (these pairs, at scale 100, give
  losses up to 35).
- fp32 gradients: 1e-5 relative to the largest reference entry. A logit S of magnitude up
  to `scale` is rounded to about eps32 * scale (6e-6 at scale 100) and every softmax or
  sigmoid weight, hence every gradient term, carries that relative error.
- fp64 loss and gradients: 1e-12 absolute (the same argument with eps64 gives ~1e-14).
A fp64 run must also be strictly closer to OpenCLIP's fp64 result than the fp32 run, so
fp64 inputs silently computed in fp32 would fail."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from support.openclip import load
from vlm.kernels.contrastive import contrastive_loss

BLOCKS = 32
SETTINGS = {"softmax": (100.0, None), "sigmoid": (10.0, -10.0)}  # CLIP's max scale; SigLIP's init


def features(b: int, d: int, kind: str, dtype: torch.dtype):
    """Seeded L2-normalised image rows, text rows correlated with them, scale (and bias)."""
    g = torch.Generator().manual_seed(1000 * b + d)
    image = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(image + torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    scale, bias = SETTINGS[kind]
    params = [torch.tensor([scale], dtype=torch.float64)]
    if bias is not None:
        params.append(torch.tensor([bias], dtype=torch.float64))
    return [t.to(dtype) for t in (image, text, *params)]


def openclip(kind: str):
    oc_loss = load("loss")
    return oc_loss.ClipLoss() if kind == "softmax" else oc_loss.SigLipLoss()


def ours(kind: str, impl: str, labels=None):
    def loss(image, text, scale, bias=None):
        return contrastive_loss(image, text, scale, bias, kind=kind, labels=labels, impl=impl,
                                block_rows=BLOCKS, block_cols=BLOCKS)
    return loss


def loss_and_grads(fn, inputs):
    """[loss, d/d each input] of fn(*inputs), on leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach(), *grads]


def max_diffs(got, expected):
    return [(g.double() - e.double()).abs().max().item() for g, e in zip(got, expected)]


@pytest.mark.parametrize("impl", ["torch", "naive"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("b", [1, 7, 130])
def test_float32_matches_openclip(b, d, kind, impl):
    inputs = features(b, d, kind, torch.float32)
    got = loss_and_grads(ours(kind, impl), inputs)
    expected = loss_and_grads(openclip(kind), inputs)
    assert got[0].dtype == torch.float32
    diffs = max_diffs(got, expected)
    assert diffs[0] <= 1e-6 * max(1.0, expected[0].abs().item()), diffs
    for diff, e in zip(diffs[1:], expected[1:]):
        assert diff <= 1e-5 * e.abs().max().item(), diffs


@pytest.mark.parametrize("impl", ["torch", "naive"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("b", [1, 7, 130])
def test_float64_matches_openclip(b, d, kind, impl):
    inputs = features(b, d, kind, torch.float64)
    got = loss_and_grads(ours(kind, impl), inputs)
    expected = loss_and_grads(openclip(kind), inputs)
    assert all(t.dtype == torch.float64 for t in got), [t.dtype for t in got]
    diffs = max_diffs(got, expected)
    assert max(diffs) <= 1e-12, diffs


@pytest.mark.parametrize("impl", ["torch", "naive"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_float64_is_computed_in_float64(kind, impl):
    b, d = 130, 64
    reference = loss_and_grads(openclip(kind), features(b, d, kind, torch.float64))
    run64 = loss_and_grads(ours(kind, impl), features(b, d, kind, torch.float64))
    run32 = loss_and_grads(ours(kind, impl), features(b, d, kind, torch.float32))
    err64, err32 = max(max_diffs(run64, reference)), max(max_diffs(run32, reference))
    assert err64 < err32, (err64, err32)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_float64_with_labels_tiles_match_naive(kind):
    """UniCL labels have no OpenCLIP counterpart: in fp64 the tiles and the textbook
    formula must then agree to rounding (1e-12), every positive weight included."""
    b, d = 130, 16
    inputs = features(b, d, kind, torch.float64)
    labels = torch.randint(-1, 6, (b,), generator=torch.Generator().manual_seed(0))
    got = loss_and_grads(ours(kind, "torch", labels), inputs)
    expected = loss_and_grads(ours(kind, "naive", labels), inputs)
    assert max(max_diffs(got, expected)) <= 1e-12, max_diffs(got, expected)
