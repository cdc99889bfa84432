"""vlm.kernels.contrastive on 2 gloo processes, each with half of the batch: the mean of the
rank losses, the rank feature gradients / W and the mean of the scale/bias gradients equal
the loss and gradients of one process on the concatenated batch. One spawn serves all."""
import numpy as np
import torch
import torch.nn.functional as F

from vlm.kernels import contrastive
from vlm.kernels.contrastive import contrastive_loss

from support.multiproc import run_ranks

RANKS, PER_RANK, D = 2, 13, 7
B = RANKS * PER_RANK
# (kind, labelled, impl, blocks): tiles that straddle the rank boundary and do not divide b
CASES = [("softmax", False, "torch", (4, 8)), ("softmax", True, "torch", (4, 8)),
         ("sigmoid", False, "torch", (4, 8)), ("sigmoid", True, "torch", (5, 8)),
         ("softmax", True, "triton", (16, 16)), ("sigmoid", True, "triton", (16, 16))]
# labels shared across the two halves, and unlabelled rows on both
LABELS = torch.tensor([0, 1, -1, 0, 2, 1, -1, 0, 3, 2, 4, -1, 4, 0, 1, -1, 3, 5, 2, -1, 5, 0, -1, 1, 3, 6])


def global_inputs(kind, labelled):
    g = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(B, D, generator=g), dim=-1) for _ in range(2))
    bias = torch.tensor([-3.0]) if kind == "sigmoid" else None
    return image, text, torch.tensor([12.0]), bias, LABELS if labelled else None


def rank_inputs(inputs, rank):
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    image, text, scale, bias, labels = inputs
    return image[rows], text[rows], scale, bias, labels[rows] if labels is not None else None


def loss_and_grads(inputs, kind, impl, blocks, weight=1.0):
    """The loss and the gradients of (weight * loss) for image, text, scale(, bias), as numpy."""
    image, text, scale, bias, labels = inputs
    leaves = [t.clone().requires_grad_() for t in (image, text, scale, bias) if t is not None]
    loss = contrastive_loss(*leaves[:3], leaves[3] if bias is not None else None, kind=kind, labels=labels,
                            impl=impl, block_rows=blocks[0], block_cols=blocks[1])
    (weight * loss).backward()
    return loss.item(), [t.grad.numpy() for t in leaves]


def _rank(rank):
    results = {}
    for kind, labelled, impl, blocks in CASES:
        inputs = rank_inputs(global_inputs(kind, labelled), rank)
        results[kind, labelled, impl] = loss_and_grads(inputs, kind, impl, blocks)
    # ranks whose upstream gradients differ: the tiled gradients must still be those of
    # sum_r g_r loss_r, which the naive path gets through gather_features' autograd
    for kind in ("softmax", "sigmoid"):
        inputs = rank_inputs(global_inputs(kind, True), rank)
        results[kind, "weighted"] = [loss_and_grads(inputs, kind, impl, (4, 8), weight=rank + 1.0)
                                     for impl in ("torch", "naive")]
    # columns exchanged in chunks smaller than a rank's rows (4 of 13): the same results
    # and no rank ever holds every rank's columns (B x D) or a b x B matrix
    from support.dispatch import LargestTensor

    contrastive.COLUMN_CHUNK = 4
    for kind, labelled, impl, blocks in CASES:
        inputs = rank_inputs(global_inputs(kind, labelled), rank)
        with LargestTensor() as trace:
            results[kind, labelled, impl, "chunked"] = loss_and_grads(inputs, kind, impl, blocks)
        if impl == "torch":
            results[kind, labelled, "largest"] = trace.largest
    return results


def close(got, expected, rtol=1e-5):
    return np.abs(got - expected).max() <= rtol * max(np.abs(expected).max(), 1e-3)


def test_two_ranks_match_one_process_on_the_global_batch():
    per_rank = run_ranks(_rank, RANKS)
    for kind, labelled, impl, blocks in CASES:
        loss, grads = loss_and_grads(global_inputs(kind, labelled), kind, impl, blocks)
        for case in ((kind, labelled, impl), (kind, labelled, impl, "chunked")):
            ranks = [per_rank[r][case] for r in range(RANKS)]
            assert_matches_global(ranks, loss, grads, case)
        if impl == "torch":
            largest = max(per_rank[r][kind, labelled, "largest"] for r in range(RANKS))
            assert largest <= max(PER_RANK * D, blocks[0] * blocks[1], B) < B * D, (kind, labelled, largest)

    for kind in ("softmax", "sigmoid"):
        tiled, naive = zip(*[per_rank[r][kind, "weighted"] for r in range(RANKS)])
        for r in range(RANKS):
            assert close(tiled[r][0], naive[r][0]), (kind, r)
            for k in (0, 1):
                assert close(tiled[r][1][k], naive[r][1][k]), (kind, r, k)
        for k in range(2, len(tiled[0][1])):
            assert close(sum(t[1][k] for t in tiled), sum(n[1][k] for n in naive)), (kind, k)


def assert_matches_global(ranks, loss, grads, case):
    assert close(np.mean([r[0] for r in ranks]), loss), case
    for k in (0, 1):  # image, text: this rank's rows of W x the global gradient
        assert close(np.concatenate([r[1][k] for r in ranks]) / RANKS, grads[k]), (case, k)
    for k in range(2, len(grads)):  # scale, bias: averaged over ranks (DeepSpeed)
        assert close(np.mean([r[1][k] for r in ranks], axis=0), grads[k]), (case, k)
