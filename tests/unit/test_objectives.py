"""Each objective against a naive float64 implementation of its equation, value and gradient
(w.r.t. every input and every parameter the objective owns); the registry and configs."""
import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from vlm.objectives.clip_infonce import ClipInfoNCE, clip_infonce
from vlm.objectives.configs import (OBJECTIVE_CONFIGS, AnyObjectiveConfig, ClipInfoNCEConfig, SigLIPConfig, SlipImageConfig,
                                    UniCLConfig)
from vlm.objectives.registry import OBJECTIVES, build_objective
from vlm.objectives.siglip import SigLIP
from vlm.objectives.slip_image import SlipImage
from vlm.objectives.unicl import UniCL

E, W = 8, 12  # embed_dim, vision_width


def unit(*shape):
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1)


def assert_matches(got, ref, got_leaves, ref_leaves):
    """float32 `got` within 1e-5 relative of float64 `ref`, in value and in every gradient."""
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-8), (float(got), float(ref))
    for a, e in zip(torch.autograd.grad(got, got_leaves), torch.autograd.grad(ref, ref_leaves)):
        assert torch.allclose(a.double(), e, rtol=1e-5, atol=1e-5 * float(e.abs().max()) + 1e-8)


def as_reference(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def naive_infonce(img, txt, scale):
    """Survey eq. 2-3 written out: mean over i of -log softmax, both directions, averaged."""
    s = scale.exp() * img @ txt.T
    n = s.shape[0]
    i2t = -sum(torch.log(torch.exp(s[i, i]) / torch.exp(s[i]).sum()) for i in range(n)) / n
    t2i = -sum(torch.log(torch.exp(s[i, i]) / torch.exp(s[:, i]).sum()) for i in range(n)) / n
    return (i2t + t2i) / 2


def naive_siglip(img, txt, scale, bias):
    """(1/B) Σ_ij -log σ(z_ij (t x_i·y_j + b)), σ(u) = 1 / (1 + e^-u), z = +1 iff i = j."""
    n = img.shape[0]
    total = 0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            u = z * (scale.exp() * (img[i] * txt[j]).sum() + bias)
            total = total - torch.log(1 / (1 + torch.exp(-u)))
    return total.squeeze() / n


def naive_head(x, w1, b1, gamma, beta, w2, b2, eps=1e-5):
    """Linear -> LayerNorm -> ReLU -> Linear -> L2 normalisation, spelled out."""
    h = x @ w1.T + b1
    mu = h.mean(dim=-1, keepdim=True)
    var = ((h - mu) ** 2).mean(dim=-1, keepdim=True)
    h = (h - mu) / torch.sqrt(var + eps) * gamma + beta
    h = torch.clamp(h, min=0) @ w2.T + b2
    return h / torch.sqrt((h ** 2).sum(dim=-1, keepdim=True))


def naive_nt_xent(z, temperature):
    """Survey eq. 1 over 2N views laid out [view 1; view 2]: positive = the other view of the
    same image, keys = every view but the query itself; mean over all 2N queries."""
    rows, n = z.shape[0], z.shape[0] // 2
    total = 0
    for i in range(rows):
        pos = (i + n) % rows
        den = sum(torch.exp((z[i] * z[j]).sum() / temperature) for j in range(rows) if j != i)
        total = total - torch.log(torch.exp((z[i] * z[pos]).sum() / temperature) / den)
    return total / rows


def naive_unicl(img, txt, labels, scale):
    """Survey eq. 4-5 with the mean over rows and of the two directions. P(i) = {k: y_k = y_i}
    for a labelled i; {i} for an unlabelled one (y = -1)."""
    s = scale.exp() * img @ txt.T
    n = s.shape[0]

    def positives(i):
        if labels[i] < 0:
            return [i]
        return [k for k in range(n) if labels[k] == labels[i]]

    i2t = t2i = 0
    for i in range(n):
        p = positives(i)
        i2t = i2t - sum(torch.log(torch.exp(s[i, k]) / torch.exp(s[i]).sum()) for k in p) / len(p)
        t2i = t2i - sum(torch.log(torch.exp(s[k, i]) / torch.exp(s[:, i]).sum()) for k in p) / len(p)
    return (i2t / n + t2i / n) / 2


@pytest.mark.parametrize("b", [1, 7, 13])
def test_clip_infonce_matches_naive_value_and_gradient(b):
    torch.manual_seed(b)
    img, txt = unit(b, E).requires_grad_(), unit(b, E).requires_grad_()
    scale = torch.tensor([2.3], requires_grad=True)
    got = clip_infonce(image_embed=img, text_embed=txt, logit_scale=scale)
    assert_matches(got, naive_infonce(*(ref := as_reference(img, txt, scale))), (img, txt, scale), ref)
    # the same through the module, whose own parameter is the temperature
    obj = ClipInfoNCE(ClipInfoNCEConfig(init_temperature=0.15), embed_dim=E, vision_width=W)
    out = obj({"image_embed": img, "text_embed": txt}, {})
    assert list(out) == ["clip_infonce", "clip_infonce/temperature"]
    assert math.isclose(float(out["clip_infonce/temperature"]), 0.15, rel_tol=1e-6)
    ref = as_reference(img, txt, obj.logit_scale)
    assert_matches(out["clip_infonce"], naive_infonce(*ref), (img, txt, obj.logit_scale), ref)


def test_clip_infonce_clamps_inverse_temperature_at_100():
    img, txt = unit(5, E), unit(5, E)
    scale = torch.tensor([math.log(500.0)], requires_grad=True)
    loss = clip_infonce(image_embed=img, text_embed=txt, logit_scale=scale)
    assert torch.allclose(loss, clip_infonce(image_embed=img, text_embed=txt, logit_scale=torch.tensor([math.log(100.0)])))
    loss.backward()
    assert scale.grad.item() == 0.0


@pytest.mark.parametrize("b", [1, 7, 13])
def test_siglip_matches_naive_value_and_gradient(b):
    torch.manual_seed(b)
    obj = SigLIP(SigLIPConfig(init_temperature=0.2, init_bias=-3.0), embed_dim=E, vision_width=W)
    img, txt = unit(b, E).requires_grad_(), unit(b, E).requires_grad_()
    out = obj({"image_embed": img, "text_embed": txt}, {})
    assert list(out) == ["siglip", "siglip/temperature", "siglip/bias"]
    got_leaves = (img, txt, obj.logit_scale, obj.logit_bias)
    ref = as_reference(*got_leaves)
    assert_matches(out["siglip"], naive_siglip(*ref), got_leaves, ref)


def test_siglip_starts_from_the_papers_initialisation():
    obj = SigLIP(SigLIPConfig(), embed_dim=E, vision_width=W)
    assert torch.allclose(obj.logit_scale, torch.tensor([math.log(10.0)]))
    assert obj.logit_bias.item() == -10.0


@pytest.mark.parametrize("b", [1, 7, 13])
def test_slip_image_matches_naive_value_and_gradient(b):
    torch.manual_seed(b)
    obj = SlipImage(SlipImageConfig(head_hidden=16, head_dim=6, temperature=0.2), embed_dim=E, vision_width=W)
    with torch.no_grad():  # LayerNorm starts at gamma = 1, beta = 0: move it so it is tested
        obj.head[1].weight.add_(0.3 * torch.randn(16))
        obj.head[1].bias.add_(0.3 * torch.randn(16))
    views = torch.randn(2 * b, W, requires_grad=True)
    out = obj({"view_pooled": views}, {})
    assert list(out) == ["slip_image"]
    params = [obj.head[0].weight, obj.head[0].bias, obj.head[1].weight, obj.head[1].bias,
              obj.head[3].weight, obj.head[3].bias]
    assert len(params) == len(list(obj.parameters()))
    ref = as_reference(views, *params)
    assert_matches(out["slip_image"], naive_nt_xent(naive_head(*ref), 0.2), (views, *params), ref)


@pytest.mark.parametrize("labels", [
    [0],
    [-1],
    [3, 1, 3, -1, 1, 3, 7],                                # several positives, an unlabelled row
    [2, 2, -1, 0, -1, 2, 5, 0, -1, 5, 2, 9, 0],
    [4, 4, 4, 4, 4, 4, 4],                                 # every column a positive of every row
], ids=["1", "1-unlabelled", "7", "13", "7-one-label"])
def test_unicl_matches_naive_value_and_gradient(labels):
    torch.manual_seed(len(labels))
    b = len(labels)
    labels = torch.tensor(labels)
    obj = UniCL(UniCLConfig(init_temperature=0.15), embed_dim=E, vision_width=W)
    img, txt = unit(b, E).requires_grad_(), unit(b, E).requires_grad_()
    out = obj({"image_embed": img, "text_embed": txt}, {"labels": labels})
    assert list(out) == ["unicl", "unicl/temperature"]
    got_leaves = (img, txt, obj.logit_scale)
    ref = as_reference(*got_leaves)
    assert_matches(out["unicl"], naive_unicl(ref[0], ref[1], labels.tolist(), ref[2]), got_leaves, ref)


@pytest.mark.parametrize("b", [1, 7, 13])
def test_unicl_without_labels_is_clip_infonce(b):
    torch.manual_seed(b)
    img, txt = unit(b, E), unit(b, E)
    outputs = {"image_embed": img, "text_embed": txt}
    unicl = UniCL(UniCLConfig(), embed_dim=E, vision_width=W)(outputs, {"labels": torch.full((b,), -1)})
    clip = ClipInfoNCE(ClipInfoNCEConfig(), embed_dim=E, vision_width=W)(outputs, {})
    assert torch.allclose(unicl["unicl"], clip["clip_infonce"], rtol=1e-6)


def test_infonce_at_initialisation_is_close_to_log_batch():
    """Random unit features make every logit ~0 ± 14/sqrt(512): the loss is about ln B."""
    torch.manual_seed(0)
    b = 256
    obj = ClipInfoNCE(ClipInfoNCEConfig(init_temperature=0.07), embed_dim=512, vision_width=W)
    loss = obj({"image_embed": unit(b, 512), "text_embed": unit(b, 512)}, {})["clip_infonce"]
    assert abs(loss.item() - math.log(b)) < 0.3


CONTRASTIVE = [c for c in OBJECTIVE_CONFIGS if not getattr(OBJECTIVES[c().name], "uses_model", False)]


def test_registry_names_configs_and_classes_agree():
    assert set(OBJECTIVES) == {"clip_infonce", "siglip", "slip_image", "unicl",
                               "mim", "mlm", "mcm", "itg", "itm", "region_word"}
    assert [c().name for c in OBJECTIVE_CONFIGS] == list(OBJECTIVES)
    for name, cls in OBJECTIVES.items():
        assert cls.name == name
        # batch-coupled = scored against the whole (global) batch: the contrastive ones and ITM
        assert cls.batch_coupled is (name in {"clip_infonce", "siglip", "slip_image", "unicl", "itm"})
        assert isinstance(cls.needs, frozenset)
        if not getattr(cls, "uses_model", False):
            assert cls.needs  # they read only model outputs: say which


@pytest.mark.parametrize("config", CONTRASTIVE, ids=lambda c: c().name)
def test_build_objective_gives_a_module_with_no_0d_parameters(config):
    obj = build_objective(config(), embed_dim=E, vision_width=W)
    assert isinstance(obj, OBJECTIVES[config().name])
    assert all(p.ndim >= 1 for p in obj.parameters())
    torch.manual_seed(0)
    outputs = {"image_embed": unit(3, E), "text_embed": unit(3, E), "view_pooled": torch.randn(6, W)}
    out = obj({k: v for k, v in outputs.items() if k in obj.needs}, {"labels": torch.tensor([0, -1, 0])})
    assert next(iter(out)) == obj.name
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(not v.requires_grad for k, v in out.items() if "/" in k)


def test_configs_are_validated_by_name():
    adapter = TypeAdapter(AnyObjectiveConfig)
    assert isinstance(adapter.validate_python({"name": "unicl", "weight": 0.5}), UniCLConfig)
    assert adapter.validate_python({"name": "slip_image", "head_dim": 64}).head_dim == 64
    for bad in ({"name": "nope"}, {"name": "siglip", "head_dim": 64}, {"name": "clip_infonce", "weight": 0},
                {"name": "slip_image", "temperature": -1}):
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        build_objective(ClipInfoNCEConfig.model_construct(name="nope"), embed_dim=E, vision_width=W)


def test_fixed_temperature_is_not_learned():
    obj = build_objective(ClipInfoNCEConfig(learn_temperature=False), embed_dim=E, vision_width=W)
    assert not obj.logit_scale.requires_grad
