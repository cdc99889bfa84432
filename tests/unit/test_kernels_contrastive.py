"""vlm.kernels.contrastive on one process: value and gradients (image, text, scale, bias)
of the tiled torch path and of the Triton kernels (through the interpreter on CPU) against
a float64 textbook reference; agreement with the objectives it replaces; input checks;
and an allocation trace showing the tiled path never holds anything of B x B size."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm.kernels.contrastive import contrastive_loss
from vlm.objectives.clip_infonce import MAX_LOGIT_SCALE, clip_infonce
from vlm.objectives.siglip import siglip
from vlm.objectives.unicl import unicl
from support.dispatch import LargestTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from loss_memory import measure  # noqa: E402
from support.threads import one_thread  # noqa: F401  (autouse: one torch thread here)


def reference(image, text, scale, bias, kind, labels):
    """The plain formula on the full float64 logits, one process."""
    x, y = image.double(), text.double()
    logits = scale.double() * x @ y.T
    n = x.shape[0]
    positive = torch.eye(n, dtype=torch.bool)
    if labels is not None:
        positive |= (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    if kind == "sigmoid":
        z = positive.double() * 2 - 1
        return -F.logsigmoid(z * (logits + bias.double())).sum() / n
    i2t = -(positive / positive.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    t2i = -(positive.T / positive.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


def make_inputs(n, d, kind, labelled, dtype=torch.float32, seed=0, scale=14.0, normalise=True):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, d, generator=g) for _ in range(2)]
    image, text = [(F.normalize(f, dim=-1) if normalise else f).to(dtype) for f in feats]
    labels = torch.randint(-1, max(2, n // 4), (n,), generator=g) if labelled else None
    bias = torch.tensor([-4.0]) if kind == "sigmoid" else None
    return image, text, torch.tensor([scale]), bias, labels


def loss_and_grads(fn, image, text, scale, bias, labels):
    """fn's loss and the gradients of its four differentiable inputs."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (image, text, scale, bias)]
    loss = fn(*leaves, labels)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def tiled(impl, kind, blocks):
    return lambda i, t, s, b, labels: contrastive_loss(i, t, s, b, kind=kind, labels=labels, impl=impl,
                                                       block_rows=blocks[0], block_cols=blocks[1])


def check(got, expected, dtype):
    """fp32: within 1e-5 of the largest entry (of 1 for the scalars: d_bias sums O(1)
    terms that cancel to ~1e-3, which fp32 cannot resolve to 1e-5 of the result);
    16-bit: 5e-3 absolute or 5e-2 relative."""
    for name, g, e in zip(("loss", "d_image", "d_text", "d_scale", "d_bias"), got, expected):
        g, e = g.double(), e.double()
        if dtype == torch.float32:
            err, size = (g - e).abs().max().item(), e.abs().max().item()
            assert err <= 1e-5 * (max(size, 1.0) if e.numel() == 1 else size), (name, err, size)
        else:
            assert torch.allclose(g, e, atol=5e-3, rtol=5e-2), (name, (g - e).abs().max().item())


def compare(impl, n, d, kind, labelled, blocks, dtype=torch.float32, **inputs):
    args = make_inputs(n, d, kind, labelled, dtype, **inputs)
    got = loss_and_grads(tiled(impl, kind, blocks), *args)
    assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[1:3])
    check(got, loss_and_grads(lambda i, t, s, b, labels: reference(i, t, s, b, kind, labels), *args), dtype)


TORCH_BLOCKS = [(16, 32), (5, 48), (1024, 1024), (None, None)]  # ragged, non-dividing, larger than B, default


@pytest.mark.parametrize("n", [1, 7, 70, 257])
@pytest.mark.parametrize("d", [3, 64, 130])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("labelled", [False, True])
def test_torch_tiles_match_the_float64_reference(n, d, kind, labelled):
    for blocks in TORCH_BLOCKS:
        compare("torch", n, d, kind, labelled, blocks)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_far_apart_logits(impl, kind):
    # unnormalised features at CLIP's largest scale: logits up to ~1000, row maxima hundreds
    # apart, so the online log-sum-exp must rescale rather than rely on bounded logits. Such
    # logits carry ~1e-4 absolute fp32 error whatever the order of the sums, so the bar is
    # the error of the textbook formula in fp32, not 1e-5.
    args = make_inputs(70, 64, kind, True, scale=100.0, normalise=False)
    reference64 = loss_and_grads(lambda i, t, s, b, labels: reference(i, t, s, b, kind, labels), *args)
    reference32 = loss_and_grads(tiled("naive", kind, (None, None)), *args)
    got = loss_and_grads(tiled(impl, kind, (16, 32)), *args)
    for name, g, r32, r64 in zip(("loss", "d_image", "d_text", "d_scale", "d_bias"), got, reference32, reference64):
        bar = (r32.double() - r64).abs().max().item()
        err = (g.double() - r64).abs().max().item()
        assert err <= 4 * bar + 1e-5 * r64.abs().max().item(), (name, err, bar)


@pytest.mark.parametrize("n,kind,dtype", [(70, "softmax", torch.bfloat16), (257, "sigmoid", torch.bfloat16),
                                          (70, "sigmoid", torch.float16), (257, "softmax", torch.float16)])
def test_torch_tiles_16_bit(n, kind, dtype):
    compare("torch", n, 64, kind, True, (32, 64), dtype)


# every B, D, kind, labels, bf16 and ragged / larger-than-B tiles at least once; 257 rows in
# 32-row blocks are 9 row blocks on 4 interpreter programs, so the strided row loop runs
TRITON_CASES = [
    (1, 3, "softmax", False, (16, 16), torch.float32),
    (7, 130, "sigmoid", True, (16, 32), torch.float32),
    (7, 64, "softmax", True, (64, 64), torch.float32),
    (70, 3, "sigmoid", False, (64, 128), torch.float32),
    (70, 130, "softmax", True, (32, 16), torch.float32),
    (70, 64, "softmax", True, (32, 32), torch.bfloat16),
    (70, 130, "sigmoid", True, (16, 32), torch.bfloat16),
    (257, 64, "softmax", True, (32, 32), torch.float32),
    (257, 130, "sigmoid", True, (32, 64), torch.float32),
    (257, 3, "softmax", False, (32, 64), torch.float32),
]


@pytest.mark.parametrize("n,d,kind,labelled,blocks,dtype", TRITON_CASES)
def test_triton_kernels_match_the_float64_reference(n, d, kind, labelled, blocks, dtype):
    compare("triton", n, d, kind, labelled, blocks, dtype)


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_matches_the_objectives(impl):
    image, text, _, _, labels = make_inputs(70, 64, "softmax", True)
    logit_scale, logit_bias = torch.tensor([math.log(1 / 0.07)]), torch.tensor([-3.0])
    clip_scale = lambda ls: ls.clamp(max=MAX_LOGIT_SCALE).exp()
    cases = [
        (lambda i, t, ls, lb, _: clip_infonce(image_embed=i, text_embed=t, logit_scale=ls),
         lambda i, t, ls, lb, _: contrastive_loss(i, t, clip_scale(ls), impl=impl, block_rows=16, block_cols=32)),
        (lambda i, t, ls, lb, lab: unicl(image_embed=i, text_embed=t, labels=lab, logit_scale=ls),
         lambda i, t, ls, lb, lab: contrastive_loss(i, t, clip_scale(ls), labels=lab, impl=impl, block_rows=16,
                                                    block_cols=32)),
        (lambda i, t, ls, lb, _: siglip(image_embed=i, text_embed=t, logit_scale=ls, logit_bias=lb),
         lambda i, t, ls, lb, _: contrastive_loss(i, t, ls.exp(), lb, kind="sigmoid", impl=impl, block_rows=16,
                                                  block_cols=32)),
    ]
    for objective, ours in cases:
        expected = loss_and_grads(objective, image, text, logit_scale, logit_bias, labels)
        got = loss_and_grads(ours, image, text, logit_scale, logit_bias, labels)
        for g, e in zip(got, expected):
            if e is None:  # clip/unicl leave the bias untouched
                continue
            assert (g - e).abs().max() <= 1e-6 * max(1.0, e.abs().max().item()), (g, e)


def test_bad_inputs_raise_clear_errors():
    x, y, s, b = torch.randn(4, 3), torch.randn(4, 3), torch.ones(1), torch.zeros(1)
    bad = [
        (dict(image=torch.randn(4, 5)), "same shape"),
        (dict(image=torch.randn(4)), r"\[b, D\]"),
        (dict(image=torch.randn(0, 3), text=torch.randn(0, 3)), r"\[b, D\]"),
        (dict(image=x.int(), text=y.int()), "float64, float32, bfloat16 or float16"),
        (dict(image=x.double(), text=y.double(), impl="triton"), "use impl='torch'"),
        (dict(text=y.bfloat16()), "share dtype"),
        (dict(bias=b), "no bias"),
        (dict(kind="sigmoid", bias=None), "needs bias"),
        (dict(kind="hinge"), "kind must be"),
        (dict(impl="cuda"), "impl must be"),
        (dict(scale=torch.ones(2)), "1-element"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), r"\[b\] = \[4\]"),
        (dict(labels=torch.zeros(4, dtype=torch.int32)), "int64"),
        (dict(block_rows=0), "block_rows must be a positive int"),
        (dict(block_cols=-2), "block_cols must be a positive int"),
    ]
    for change, message in bad:
        args = dict(image=x, text=y, scale=s, bias=None, kind="softmax", labels=None, impl="torch")
        args.update(change)
        with pytest.raises(ValueError, match=message):
            contrastive_loss(args.pop("image"), args.pop("text"), args.pop("scale"), args.pop("bias"), **args)
    with pytest.raises(ValueError, match="power-of-two blocks"):
        contrastive_loss(x, y, s, impl="triton", block_rows=24, block_cols=16)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("labelled", [False, True])
def test_tiled_path_never_allocates_b_by_b(kind, labelled):
    n, d, blocks = 257, 3, (32, 32)
    image, text, scale, bias, labels = make_inputs(n, d, kind, labelled)
    leaves = [t.requires_grad_() for t in (image, text, scale) + ((bias,) if bias is not None else ())]
    for impl in ("naive", "torch"):
        for t in leaves:
            t.grad = None
        with LargestTensor() as trace:
            contrastive_loss(image, text, scale, bias, kind=kind, labels=labels, impl=impl, block_rows=blocks[0],
                             block_cols=blocks[1]).backward()
        assert image.grad is not None
        if impl == "naive":  # the trace does see a B x B matrix when there is one
            assert trace.largest >= n * n
        else:
            assert "aten.addmm_.default" in trace.ops  # the backward pass was traced too
            # nothing bigger than a tile, a [B, D] matrix or a [B] vector
            assert trace.largest <= max(blocks[0] * blocks[1], n * d, n), trace.largest


def test_peak_memory_of_a_step_stays_below_one_logit_matrix():
    # a real process's resident peak (benchmarks/loss_memory.py measures it the same way at
    # larger sizes); a [B, B] fp32 matrix is 64 MiB here
    n = 4096
    naive = measure("naive", "softmax", n, 16, threads=1)
    tiled = measure("torch", "softmax", n, 16, blocks=(256, 256), threads=1)
    assert naive["step_bytes"] >= n * n * 4, naive
    assert tiled["step_bytes"] <= n * n * 4 / 8, tiled


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_zero_dim_scale_and_bias_get_gradients_of_their_shape(kind):
    image, text, _, _, labels = make_inputs(7, 3, kind, True)
    scale = torch.tensor(14.0, requires_grad=True)
    bias = torch.tensor(-4.0, requires_grad=True) if kind == "sigmoid" else None
    contrastive_loss(image, text, scale, bias, kind=kind, labels=labels).backward()
    assert scale.grad.shape == () and (bias is None or bias.grad.shape == ())
