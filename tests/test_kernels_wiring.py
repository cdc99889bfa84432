"""`kernels:` in the run config reaches every objective with a memory-heavy loss: the same
objective, parameters and inputs give the same loss and gradients (model and objective
parameters, embeddings) with kernels naive (full logits), torch (tiled / chunked) and
triton (under TRITON_INTERPRET=1 here); and the config refuses what cannot run."""
import copy

import pytest
import torch

from vlm.config import ConfigError, load_config
from vlm.kernels import resolve
from vlm.models import build_model
from vlm.models.config import ModelConfig
from vlm.objectives import (ClipInfoNCEConfig, ITGConfig, MCMConfig, MLMConfig, SigLIPConfig, UniCLConfig,
                            build_objective)

torch.set_num_threads(1)
V = 97


def small_model(**extra):
    cfg = {"embed_dim": 16, "vision": {"image_size": 16, "patch_size": 4, "width": 32, "depth": 1, "heads": 2},
           "text": {"context_length": 12, "width": 32, "depth": 1, "heads": 2, "causal": True}, **extra}
    return build_model(ModelConfig(**cfg), vocab_size=V)


def batch(b=6, n=12):
    g = torch.Generator().manual_seed(0)
    eot = torch.randint(3, n, (b,), generator=g)
    tokens = torch.randint(3, V, (b, n), generator=g)
    tokens[:, 0] = 1
    tokens[torch.arange(b), eot] = 2
    tokens[torch.arange(n)[None, :] > eot[:, None]] = 0
    return {"images": torch.randn(b, 3, 16, 16, generator=g), "tokens": tokens, "eot_index": eot,
            "labels": torch.tensor([0, 1, 0, -1, 1, 2])[:b]}


def run(cfg, kernels, model_extra=None):
    """Loss and every gradient of one objective on one batch, with fixed seeds so that
    masking draws the same positions whatever the kernels."""
    torch.manual_seed(0)
    model = small_model(**(model_extra or {}))
    obj = build_objective(cfg, embed_dim=16, vision_width=32, model=model, vocab_size=V, kernels=kernels)
    assert obj.kernels == kernels
    b = batch()
    torch.manual_seed(1)
    outputs = model(b["images"], b["tokens"], b["eot_index"])
    kwargs = {"model": model} if getattr(obj, "uses_model", False) else {}
    losses = obj(outputs, b, **kwargs)
    loss = losses[cfg.name]
    params = [p for p in list(model.parameters()) + list(obj.parameters()) if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


CASES = [
    (ClipInfoNCEConfig(init_temperature=0.2), None),
    (SigLIPConfig(init_temperature=0.2, init_bias=-3.0), None),
    (UniCLConfig(init_temperature=0.2), None),
    (ITGConfig(label_smoothing=0.1), {"decoder": {"depth": 1, "heads": 2}}),
    (MLMConfig(), None),
    (MCMConfig(), {"fusion": {"type": "concat", "width": 32, "depth": 1, "heads": 2}}),
]


@pytest.mark.parametrize("cfg,extra", CASES, ids=[c.name for c, _ in CASES])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_objective_same_loss_and_gradients_as_naive(cfg, extra, kernels):
    ref_loss, ref_grads = run(copy.deepcopy(cfg), "naive", extra)
    loss, grads = run(copy.deepcopy(cfg), kernels, extra)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-7), (float(loss), float(ref_loss))
    assert len(grads) == len(ref_grads)
    nonzero = 0
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6 * (float(r.abs().max()) + 1e-12)), float((g - r).abs().max())
        nonzero += bool(r.abs().sum() > 0)
    assert nonzero >= 2  # the comparison covers real gradients, not only zeros


def test_config_kernels_choice_and_resolution():
    assert load_config("configs/demo.yaml").kernels == "auto"
    assert load_config("configs/demo.yaml", ["kernels=naive"]).kernels == "naive"
    with pytest.raises(ConfigError, match="kernels"):
        load_config("configs/demo.yaml", ["kernels=fast"])
    cpu = torch.device("cpu")
    assert resolve("auto", cpu) == "torch"  # CPU: the tiled torch path, even where Triton could interpret
    assert resolve("naive", cpu) == "naive"
    with pytest.raises(ValueError, match="kernels: 'fast'"):
        resolve("fast", cpu)


def test_triton_refused_without_a_way_to_run_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="kernels: triton needs a CUDA device"):
        resolve("triton", torch.device("cpu"))
