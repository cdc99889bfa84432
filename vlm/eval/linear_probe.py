"""Linear probe on frozen image features (survey 2.3.2, as in the CLIP paper): multinomial
logistic regression (L-BFGS), its inverse regularisation C swept on a validation split
carved from the training features, then refitted on train+validation at the best C.

Splits are by position in the dataset's fixed item order, so they are the same on every
rank and every run: ``stratified_halves`` cuts an evaluation set into probe-train and
probe-test (every other item of each class), ``every_kth`` carves the validation split.

The protocol: features are eval.probe_features ("embed": the normalised image embedding
the zero-shot classifier also uses, so the two compare one linear head against another;
"pooled": the class token before the projection, as in the CLIP paper). Without
`probe_train`, the evaluation set is cut per class into alternate halves, probe-train and
probe-test, and zero-shot accuracy on the same probe-test images is reported beside the
probe (on the demo the held-out classes never occur in the training shards, so a probe
trained there could not name them). With `probe_train` (a dataset), at most
eval.probe_max_train of its items, evenly spaced, train the probe and the whole
evaluation set tests it."""
from __future__ import annotations

import numpy as np
import torch

from vlm.config import EvalConfig
from vlm.data.tokenizer import TextEncoder
from vlm.eval.context import EvalContext
from vlm.eval.datasets import iter_items
from vlm.eval.features import embed_share, gather_shares
from vlm.eval.zeroshot import zeroshot_metrics
from vlm.models.clip import CLIP


def stratified_halves(labels: list[str]) -> tuple[list[int], list[int]]:
    """Per class, items in order alternate train, test, train, ... -> (train idx, test idx)."""
    seen: dict[str, int] = {}
    train, test = [], []
    for i, label in enumerate(labels):
        n = seen[label] = seen.get(label, -1) + 1
        (train if n % 2 == 0 else test).append(i)
    return train, test


def every_kth(n: int, k: int) -> tuple[list[int], list[int]]:
    """Positions 0..n-1 -> (the others, every k-th from position k-1)."""
    held = list(range(k - 1, n, k))
    return [i for i in range(n) if i % k != k - 1], held


def evenly_spaced(n: int, at_most: int) -> list[int]:
    """A deterministic subsample of range(n) of size min(n, at_most), spread over the range."""
    if n <= at_most:
        return list(range(n))
    return [i * n // at_most for i in range(at_most)]


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, solver="lbfgs", max_iter=1000).fit(x, y)


def linear_probe(train_x: torch.Tensor, train_y: list[str], test_x: torch.Tensor, test_y: list[str], *,
                 c_grid: list[float], val_every: int = 4) -> dict:
    """train_x [N, D], test_x [M, D] frozen features; labels are class names.

    Every ``val_every``-th training item (in order) is the validation split. Ties in
    validation accuracy go to the smallest C (the strongest regularisation). With fewer
    than two classes left to fit, or no validation items, the sweep is skipped (C = 1)."""
    x, xt = train_x.double().numpy(), test_x.double().numpy()
    y, yt = np.array(train_y), np.array(test_y)
    if len(set(train_y)) < 2:
        raise ValueError(f"linear probe needs at least 2 classes in its training split, got {sorted(set(train_y))}")
    fit_idx, val_idx = every_kth(len(y), val_every)
    sweep = {}
    if val_idx and len(set(y[fit_idx])) >= 2:
        for c in sorted(c_grid):
            sweep[c] = float((_fit(x[fit_idx], y[fit_idx], c).predict(x[val_idx]) == y[val_idx]).mean())
        best_c = max(sweep, key=lambda c: (sweep[c], -c))
    else:
        best_c = 1.0
    pred = _fit(x, y, best_c).predict(xt)
    return {"linear_probe_acc1": float((pred == yt).mean()), "best_C": best_c,
            "val_acc1": sweep.get(best_c), "C_sweep": {str(c): a for c, a in sweep.items()},
            "num_train": len(fit_idx), "num_val": len(val_idx), "num_test": len(yt)}


def probe_train_features(model: CLIP, text: TextEncoder, probe_train: str, *, ev: EvalConfig, image_size: int,
                         rank: int = 0, world_size: int = 1) -> tuple[dict, list[str]]:
    """The features of at most eval.probe_max_train items of ``probe_train``, evenly spaced,
    and their labels (every item needs one)."""
    probe_index = list(iter_items(probe_train, label_template=ev.label_template, payload=False))
    if any(item.label is None for item in probe_index):
        bad = next(item for item in probe_index if item.label is None)
        raise ValueError(f"--probe-train needs a label for every item: {bad.label_error or bad.origin}")
    chosen = evenly_spaced(len(probe_index), ev.probe_max_train)
    probe_feats = gather_shares(embed_share(model, text, probe_train, chosen, ev=ev, image_size=image_size,
                                            rank=rank, world_size=world_size, captions=False), world_size)
    return probe_feats, [probe_index[i].label for i in probe_feats["index"].tolist()]


def evaluate_linear_probe(ctx: EvalContext) -> dict:
    """The linear-probe protocol, with zero-shot accuracy on the same test items beside it
    -> results["linear_probe"]."""
    ev, feats, labels = ctx.ev, ctx.feats, ctx.labels
    key = "image" if ev.probe_features == "embed" else "pooled"
    if ctx.probe_feats is None:
        train, test = stratified_halves(labels)
        train = [train[i] for i in evenly_spaced(len(train), ev.probe_max_train)]
        train_x, train_y = feats[key][train], [labels[i] for i in train]
        split = "alternate halves of each class of the evaluation set"
    else:
        test = list(range(len(labels)))
        train_x, train_y = ctx.probe_feats[key], ctx.probe_labels
        split = "probe-train dataset; the whole evaluation set tests"
    res = linear_probe(train_x, train_y, feats[key][test], [labels[i] for i in test], c_grid=ev.probe_c_grid)
    index = {c: i for i, c in enumerate(ctx.class_labels)}
    zs = zeroshot_metrics(feats["image"][test], torch.tensor([index[labels[i]] for i in test]), ctx.class_embed)
    return {**res, "zeroshot_acc1": zs["acc1"], "features": ev.probe_features, "split": split}
