import torch

from vlm.config import load_config
from vlm.models import build_clip
from vlm.objectives import clip_infonce


def naive_infonce(img, txt, scale):
    """Survey eq. 2-3 written out in float64: mean over i of -log softmax, both directions."""
    img, txt = img.double(), txt.double()
    s = scale.double().exp() * img @ txt.T
    n = s.shape[0]
    i2t = -sum(torch.log(torch.exp(s[i, i]) / torch.exp(s[i]).sum()) for i in range(n)) / n
    t2i = -sum(torch.log(torch.exp(s[i, i]) / torch.exp(s[:, i]).sum()) for i in range(n)) / n
    return (i2t + t2i) / 2


def test_clip_infonce_matches_naive_value_and_gradient():
    torch.manual_seed(0)
    for b in (1, 7, 16):
        img = torch.nn.functional.normalize(torch.randn(b, 8), dim=-1).requires_grad_()
        txt = torch.nn.functional.normalize(torch.randn(b, 8), dim=-1).requires_grad_()
        scale = torch.tensor([2.3], requires_grad=True)
        got = clip_infonce(image_embed=img, text_embed=txt, logit_scale=scale)["clip_infonce"]
        ref_inputs = [t.detach().double().requires_grad_() for t in (img, txt, scale)]
        ref = naive_infonce(*ref_inputs)
        assert torch.allclose(got.double(), ref, rtol=1e-5)
        g = torch.autograd.grad(got, (img, txt, scale))
        r = torch.autograd.grad(ref, ref_inputs)
        for a, e in zip(g, r):
            assert torch.allclose(a.double(), e, rtol=1e-5, atol=1e-6)


def test_clip_forward_backward_no_nan():
    cfg = load_config(None, ["model.vision.width=32", "model.text.width=32", "model.vision.depth=1",
                             "model.text.depth=1", "model.grad_checkpointing=true"])
    model = build_clip(cfg.model, vocab_size=50)
    out = model(torch.randn(3, 3, 32, 32), torch.randint(0, 50, (3, 24)), torch.tensor([5, 23, 0]))
    assert out["image_embed"].shape == (3, cfg.model.embed_dim)
    assert torch.allclose(out["text_embed"].norm(dim=-1), torch.ones(3))
    loss = clip_infonce(**out)["clip_infonce"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
