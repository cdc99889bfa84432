"""The generative and alignment objectives (survey eq. 6-11): each loss against a naive
float64 implementation of its equation, in value and gradient; the masking statistics
(ratios, and masked-out positions contributing exactly nothing); the losses at
initialisation (ln V for the token predictors, ln 2 for image-text matching)."""
import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from vlm.models.config import ModelConfig
from vlm.models.registry import build_model
from vlm.objectives.configs import (AnyObjectiveConfig, ITGConfig, ITMConfig, MCMConfig, MIMConfig, MLMConfig,
                                    RegionWordConfig)
from vlm.objectives.itg import caption_loss
from vlm.objectives.itm import BASE_RATE_LOSS, itm_loss, sample_hard_negatives
from vlm.objectives.mcm import block_mask
from vlm.objectives.mim import masked_patch_mse, normalised_patches, patchify, random_masking
from vlm.objectives.mlm import mask_tokens, masked_token_loss
from vlm.objectives.region_word import focal_loss
from vlm.objectives.registry import OBJECTIVES, build_objective

torch.set_num_threads(1)
V = 300  # vocabulary of the small models here


def assert_matches(got, ref, got_leaves, ref_leaves):
    """float32 `got` within 1e-5 relative of float64 `ref`, in value and in every gradient."""
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-7), (float(got), float(ref))
    for a, e in zip(torch.autograd.grad(got, got_leaves), torch.autograd.grad(ref, ref_leaves)):
        assert torch.allclose(a.double(), e, rtol=1e-4, atol=1e-5 * float(e.abs().max()) + 1e-9)


def as_reference(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def small_model(**extra) -> torch.nn.Module:
    cfg = {"embed_dim": 16, "vision": {"image_size": 16, "patch_size": 4, "width": 32, "depth": 1, "heads": 2},
           "text": {"context_length": 12, "width": 32, "depth": 1, "heads": 2}, **extra}
    return build_model(ModelConfig(**cfg), vocab_size=V)


def text_batch(b, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    eot = torch.randint(3, n, (b,), generator=g)
    tokens = torch.randint(3, V, (b, n), generator=g)
    tokens[:, 0] = 1
    tokens[torch.arange(b), eot] = 2
    tokens[torch.arange(n)[None, :] > eot[:, None]] = 0
    return tokens, eot


# ---- MIM (eq. 6)

def naive_mim(images, pred, mask, p, eps=1e-6):
    """Per masked patch: mean over its pixels of (pred - (x - mean) / sqrt(var + eps))²; the
    mean over masked patches. Patches read pixel by pixel from the image."""
    b, c, s, _ = images.shape
    g = s // p
    total, count = 0, 0
    for i in range(b):
        for k in range(g * g):
            if not mask[i, k]:
                continue
            r0, c0 = (k // g) * p, (k % g) * p
            x = torch.stack([images[i, ch, r0 + r, c0 + q] for r in range(p) for q in range(p) for ch in range(c)])
            mean = x.sum() / len(x)
            var = ((x - mean) ** 2).sum() / len(x)
            target = (x - mean) / torch.sqrt(var + eps)
            total = total + ((pred[i, k] - target) ** 2).sum() / len(x)
            count += 1
    return total / count


def test_mim_loss_matches_naive_value_and_gradient_and_ignores_visible_patches():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 4, 4)  # 2x2 patches of 2x2 pixels
    pred = torch.randn(2, 4, 12, requires_grad=True)
    _, mask = random_masking(2, 4, 0.5, generator=torch.Generator().manual_seed(1))
    got = masked_patch_mse(pred=pred, target=normalised_patches(patchify(images, 2)), mask=mask)
    ref_pred, = as_reference(pred)
    assert_matches(got, naive_mim(images.double(), ref_pred, mask, 2), (pred,), (ref_pred,))
    grad, = torch.autograd.grad(masked_patch_mse(pred=pred, target=torch.zeros_like(pred), mask=mask), pred)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()


def test_random_masking_keeps_the_configured_share_per_sample():
    keep, mask = random_masking(400, 64, 0.75, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (400, 16) and (mask.sum(1) == 48).all()
    assert (keep.diff(dim=1) > 0).all()  # sorted, distinct
    assert not mask.gather(1, keep).any()
    # every patch is masked about 75% of the time over the samples (no positional bias)
    assert abs(mask.float().mean(0) - 0.75).max() < 0.1


def test_mim_objective_sees_only_visible_patches():
    torch.manual_seed(0)
    model = small_model()
    obj = build_objective(MIMConfig(mask_ratio=0.75), embed_dim=16, vision_width=32, model=model, vocab_size=V)
    seen = []
    handle = model.visual.transformer.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    out = obj({}, {"images": torch.randn(3, 3, 16, 16)}, model=model)
    handle.remove()
    assert seen == [1 + 4]  # the class token and 16 * 0.25 visible patches
    assert out["mim/mask_ratio"] == 0.75 and torch.isfinite(out["mim"])
    out["mim"].backward()
    assert model.visual.patch_embed.weight.grad.abs().sum() > 0


# ---- MLM (eq. 7)

def naive_masked_ce(logits, targets, selected):
    terms = [-torch.log(torch.exp(logits[i, j, targets[i, j]]) / torch.exp(logits[i, j]).sum())
             for i in range(logits.shape[0]) for j in range(logits.shape[1]) if selected[i, j]]
    return sum(terms) / len(terms)


def test_mlm_loss_matches_naive_value_and_gradient_and_ignores_unselected():
    torch.manual_seed(0)
    tokens, eot = text_batch(3)
    m = mask_tokens(tokens, eot, ratio=0.4, vocab_size=V, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(3, 12, V, requires_grad=True)
    got = masked_token_loss(logits=logits, targets=tokens, selected=m["selected"])
    ref, = as_reference(logits)
    assert_matches(got, naive_masked_ce(ref, tokens, m["selected"]), (logits,), (ref,))
    grad, = torch.autograd.grad(masked_token_loss(logits=logits, targets=tokens, selected=m["selected"]), logits)
    assert (grad[~m["selected"]] == 0).all()


def test_mlm_masking_statistics_15_percent_80_10_10():
    tokens, eot = text_batch(4000, n=12, seed=1)
    m = mask_tokens(tokens, eot, ratio=0.15, vocab_size=V, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)
    maskable = (pos >= 1) & (pos < eot[:, None])
    sel = m["selected"]
    assert not (sel & ~maskable).any()  # never <sot>, <eot> or padding
    assert abs(sel.sum() / maskable.sum() - 0.15) < 0.01
    n = sel.sum().item()
    use_mask = m["use_mask"]
    changed = (m["input_ids"] != tokens)
    assert not (use_mask & ~sel).any() and not (changed & ~sel).any()
    assert abs(use_mask.sum() / n - 0.8) < 0.02
    random = sel & ~use_mask
    # 10% random ids (a random id equals the original 1/V of the time), 10% unchanged
    assert abs(changed.sum() / n - 0.1) < 0.015
    assert abs((random & ~changed).sum() / n - 0.1) < 0.015


def test_mlm_objective_at_initialisation_is_ln_vocab_and_bidirectional():
    torch.manual_seed(0)
    model = small_model()
    obj = build_objective(MLMConfig(), embed_dim=16, vision_width=32, model=model, vocab_size=V)
    tokens, eot = text_batch(64)
    calls = []
    orig = model.text.forward
    model.text.forward = lambda *a, **k: calls.append(k.get("causal")) or orig(*a, **k)
    loss = obj({}, {"tokens": tokens, "eot_index": eot}, model=model)["mlm"]
    assert calls == [False]
    assert abs(loss.item() - math.log(V)) < 0.5


# ---- MCM (eq. 8)

def test_block_mask_ratio_and_blocks():
    masks = block_mask(400, 8, 0.4, generator=torch.Generator().manual_seed(0))
    counts = masks.sum(1).float()
    assert counts.min() >= 26 and abs(counts.mean() / 64 - 0.4) < 0.04
    # blockwise: a masked patch usually has a masked 4-neighbour (random masking: ~0.87)
    grid = masks.view(400, 8, 8)
    padded = torch.nn.functional.pad(grid.float(), (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    assert (neighbours[grid] >= 2).float().mean() > 0.7


def test_mcm_objective_reconstructs_masked_parts_only_through_the_fusion_encoder():
    torch.manual_seed(0)
    for kind in ("concat", "cross"):
        model = small_model(fusion={"type": kind, "width": 32, "depth": 1, "heads": 2})
        obj = build_objective(MCMConfig(), embed_dim=16, vision_width=32, model=model, vocab_size=V)
        tokens, eot = text_batch(8)
        out = obj({}, {"images": torch.randn(8, 3, 16, 16), "tokens": tokens, "eot_index": eot}, model=model)
        assert torch.allclose(out["mcm"].detach(), out["mcm/image"] + out["mcm/text"])
        assert 6 / 16 <= out["mcm/image_mask_ratio"] < 0.5  # at least round(0.4 * 16) patches per image
        assert abs(out["mcm/text"].item() - math.log(V)) < 0.5
        out["mcm"].backward()
        assert model.fusion.text_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="model.fusion"):
        build_objective(MCMConfig(), embed_dim=16, vision_width=32, model=small_model(), vocab_size=V)


# ---- ITG (eq. 9)

def naive_caption(logits, tokens, eot, eps):
    """-log p(x_l | x_<l) per word and <eot> target (label-smoothed: (1-ε)·nll + ε·mean_k -log p_k)."""
    terms = []
    for i in range(tokens.shape[0]):
        for pos in range(1, int(eot[i]) + 1):
            row = logits[i, pos - 1]
            logp = row - torch.log(torch.exp(row).sum())
            terms.append(-(1 - eps) * logp[tokens[i, pos]] - eps * logp.sum() / len(row))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_caption_loss_matches_naive_value_and_gradient_and_ignores_padding(eps):
    torch.manual_seed(0)
    tokens, eot = text_batch(3)
    logits = torch.randn(3, 11, V, requires_grad=True)
    got = caption_loss(logits=logits, tokens=tokens, eot_index=eot, label_smoothing=eps)
    ref, = as_reference(logits)
    assert_matches(got, naive_caption(ref, tokens, eot, eps), (logits,), (ref,))
    grad, = torch.autograd.grad(caption_loss(logits=logits, tokens=tokens, eot_index=eot), logits)
    padding = torch.arange(1, 12)[None, :] > eot[:, None]
    assert padding.any() and (grad[padding] == 0).all()
    # what padding holds changes nothing
    other = tokens.clone()
    other[torch.arange(12)[None, :] > eot[:, None]] = 7
    assert caption_loss(logits=logits, tokens=other, eot_index=eot) == caption_loss(logits=logits, tokens=tokens,
                                                                                   eot_index=eot)


def test_itg_objective_at_initialisation_is_ln_vocab():
    torch.manual_seed(0)
    model = small_model(decoder={"depth": 1, "heads": 2})
    obj = build_objective(ITGConfig(), embed_dim=16, vision_width=32, model=model, vocab_size=V)
    tokens, eot = text_batch(32)
    outputs = model(torch.randn(32, 3, 16, 16), tokens, eot)
    loss = obj(outputs, {"tokens": tokens, "eot_index": eot}, model=model)["itg"]
    assert abs(loss.item() - math.log(V)) < 0.5
    with pytest.raises(ValueError, match="model.decoder"):
        build_objective(ITGConfig(), embed_dim=16, vision_width=32, model=small_model(), vocab_size=V)


# ---- ITM (eq. 10)

def test_itm_loss_matches_naive_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(9, requires_grad=True)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    got = itm_loss(logits=logits, labels=labels)
    ref, = as_reference(logits)
    s = 1 / (1 + torch.exp(-ref))
    naive = -sum(p * torch.log(s[i]) + (1 - p) * torch.log(1 - s[i]) for i, p in enumerate(labels.tolist())) / 9
    assert_matches(got, naive, (logits,), (ref,))


def test_hard_negatives_follow_the_softmax_and_never_hit_a_positive():
    sim = torch.tensor([[0.9, 0.5, 0.1, 0.8], [0.2, 0.9, 0.3, 0.3]])
    exclude = torch.tensor([[True, False, False, True], [False, True, False, False]])  # row 0: 0 and 3 are one image
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, exclude, temperature=0.5, generator=g) for _ in range(4000)])
    assert not exclude.gather(1, draws.T).any()
    for row in range(2):
        logits = (sim[row] / 0.5).masked_fill(exclude[row], float("-inf"))
        expected = torch.softmax(logits, 0)
        freq = torch.bincount(draws[:, row], minlength=4) / 4000
        assert (freq - expected).abs().max() < 0.03
    with pytest.raises(ValueError, match="two distinct images"):
        sample_hard_negatives(sim[:1], torch.ones(1, 4, dtype=torch.bool), temperature=1.0)


def test_itm_objective_at_initialisation_is_ln2_and_excludes_same_image():
    torch.manual_seed(0)
    model = small_model(fusion={"width": 32, "depth": 1, "heads": 2})
    obj = build_objective(ITMConfig(), embed_dim=16, vision_width=32, model=model, vocab_size=V)
    assert obj.uses_model and obj.batch_coupled
    tokens, eot = text_batch(32)
    outputs = model(torch.randn(32, 3, 16, 16), tokens, eot)
    out = obj(outputs, {"tokens": tokens, "eot_index": eot}, model=model)
    assert abs(out["itm"].item() - math.log(2)) < 0.05
    assert BASE_RATE_LOSS == pytest.approx(-(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3))
    # two rows of one image: neither is ever the other's negative
    ids = torch.arange(32)
    ids[1] = 0
    seen = []
    orig = obj.match_logits
    obj.match_logits = lambda m, i, t, e: seen.append((i.detach(), t.detach())) or orig(m, i, t, e)
    for _ in range(20):
        obj(outputs, {"tokens": tokens, "eot_index": eot, "image_ids": ids}, model=model)
    for images, texts in seen:
        neg_text_of_0 = texts[32 + 0]       # the negative text paired with image 0
        assert not torch.equal(neg_text_of_0, outputs["text_tokens"][1].detach())
        assert not torch.equal(images[64 + 1], outputs["image_tokens"][0].detach())
    # with exclude_same_label, rows of one class are never each other's negatives either
    obj.cfg = ITMConfig(exclude_same_label=True)
    labels = torch.arange(32) % 2  # two classes: every negative comes from the other one
    seen.clear()
    obj(outputs, {"tokens": tokens, "eot_index": eot, "labels": labels}, model=model)
    images, texts = seen[0]
    all_texts = outputs["text_tokens"].detach()
    for i in range(32):
        (j,) = [j for j in range(32) if torch.equal(all_texts[j], texts[32 + i])]
        assert labels[j] != labels[i]
    with pytest.raises(ValueError, match="labels"):
        obj(outputs, {"tokens": tokens, "eot_index": eot}, model=model)


# ---- region-word (eq. 11)

def naive_focal(logits, labels, alpha, gamma):
    total = 0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            p = 1 / (1 + torch.exp(-logits[i, j]))
            y = float(labels[i, j])
            pt = p if y else 1 - p
            a = 1.0 if alpha is None else (alpha if y else 1 - alpha)
            total = total - a * (1 - pt) ** gamma * torch.log(pt)
    return total / max(1.0, float(labels.sum()))


@pytest.mark.parametrize("alpha,gamma", [(None, 0.0), (0.25, 2.0)])
def test_focal_loss_matches_naive_value_and_gradient(alpha, gamma):
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 4)).requires_grad_()
    labels = torch.zeros(5, 4)
    labels[torch.arange(5), torch.tensor([0, 1, 1, 3, 2])] = 1
    got = focal_loss(logits=logits, labels=labels, alpha=alpha, gamma=gamma)
    ref, = as_reference(logits)
    assert_matches(got, naive_focal(ref, labels, alpha, gamma), (logits,), (ref,))


def test_region_word_objective_runs_and_ignores_padded_regions():
    torch.manual_seed(0)
    model = small_model()
    obj = build_objective(RegionWordConfig(), embed_dim=16, vision_width=32, model=model, vocab_size=V)
    tokens, eot = text_batch(4)
    outputs = model(torch.randn(4, 3, 16, 16), tokens, eot)
    ph_tokens, ph_eot = text_batch(8, seed=3)
    batch = {"boxes": torch.tensor([[0.1, 0.1, 0.6, 0.5], [0.0, 0.0, 1.0, 1.0]]).repeat(4, 1, 1),
             "box_valid": torch.tensor([[True, False], [True, True], [True, False], [False, False]]),
             "phrase_ids": torch.tensor([[5, -1], [6, 5], [7, -1], [-1, -1]]),
             "phrase_tokens": ph_tokens.view(4, 2, 12), "phrase_eot": ph_eot.view(4, 2)}
    out = obj(outputs, batch, model=model)
    assert out["region_word/phrases"] == 3 and torch.isfinite(out["region_word"])
    # what a padded region holds changes nothing
    batch2 = dict(batch, boxes=batch["boxes"].clone())
    batch2["boxes"][3] = torch.tensor([0.2, 0.2, 0.3, 0.3])
    assert torch.equal(obj(outputs, batch2, model=model)["region_word"], out["region_word"])
    none = obj(outputs, dict(batch, box_valid=torch.zeros(4, 2, dtype=torch.bool)), model=model)["region_word"]
    assert none.item() == 0.0 and none.requires_grad


# ---- registry and configs

def test_new_objectives_are_registered_with_their_coupling():
    expected = {"mim": (False, True), "mlm": (False, True), "mcm": (False, True), "itg": (False, True),
                "itm": (True, True), "region_word": (False, True)}
    for name, (coupled, uses_model) in expected.items():
        cls = OBJECTIVES[name]
        assert (cls.batch_coupled, cls.uses_model) == (coupled, uses_model), name
        assert isinstance(cls.needs, frozenset)
    adapter = TypeAdapter(AnyObjectiveConfig)
    assert adapter.validate_python({"name": "mim", "mask_ratio": 0.6}).mask_ratio == 0.6
    for bad in ({"name": "mim", "mask_ratio": 1.0}, {"name": "itg", "label_smoothing": -0.1},
                {"name": "itm", "negative_temperature": 0}, {"name": "mlm", "nope": 1}):
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)


def test_itg_input_dropout_only_in_training_and_learns_its_vector():
    torch.manual_seed(0)
    model = small_model(decoder={"depth": 1, "heads": 2})
    plain = build_objective(ITGConfig(), embed_dim=16, vision_width=32, model=model, vocab_size=V)
    dropping = build_objective(ITGConfig(input_dropout=0.5), embed_dim=16, vision_width=32, model=model,
                               vocab_size=V)
    tokens, eot = text_batch(8)
    outputs = model(torch.randn(8, 3, 16, 16), tokens, eot)
    b = {"tokens": tokens, "eot_index": eot}
    reference = plain(outputs, b, model=model)["itg"]
    dropping.eval()
    assert torch.equal(dropping(outputs, b, model=model)["itg"], reference)  # off at evaluation
    dropping.train()
    loss = dropping(outputs, b, model=model)["itg"]
    assert not torch.equal(loss, reference)
    grad, = torch.autograd.grad(loss, dropping.drop_embed)
    assert grad.abs().sum() > 0
