"""`kernels:` in the run config reaches every objective with a memory-heavy loss: the same
objective, parameters and inputs give the same loss and gradients (model and objective
parameters, embeddings) with kernels naive (full logits), torch (tiled / chunked) and
triton (under TRITON_INTERPRET=1 here); and the config refuses what cannot run."""
import copy

import pytest
import torch

from vlm.config import ConfigError, load_config
from vlm.kernels.dispatch import resolve
from vlm.models.config import ModelConfig
from vlm.models.registry import build_model
from vlm.objectives.configs import ClipInfoNCEConfig, ITGConfig, MCMConfig, MLMConfig, SigLIPConfig, UniCLConfig
from vlm.objectives.registry import build_objective

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


# ---- under DeepSpeed ZeRO-3, every parameter partitioned, on 2 gloo ranks

ZERO3_STEPS = 3


def _zero3_rank(rank: int) -> dict:
    """Losses of a few ZeRO-3 steps of CLIP + captioning + MLM, with kernels naive and torch:
    the fused vocabulary heads must see their gathered weights, not ZeRO-3's empty shards."""
    import os

    import deepspeed
    import torch.distributed as dist

    from vlm.config import load_config
    from vlm.train.deepspeed_config import deepspeed_config
    from vlm.train.module import build_pretrainer
    from vlm.train.optim import lr_lambda, param_groups

    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = {}
    for kernels in ("naive", "torch"):
        cfg = load_config(None, [
            "model.embed_dim=16", "model.vision.image_size=16", "model.vision.patch_size=4", "model.vision.width=32",
            "model.vision.depth=1", "model.vision.heads=2", "model.text.width=32", "model.text.depth=1",
            "model.text.heads=2", "model.text.context_length=12", "model.text.causal=true",
            "model.decoder={depth: 1, heads: 2}", "data.ingest.image_size=16", "train.zero_stage=3",
            "train.micro_batch_size=6", f"kernels={kernels}", "optim.lr=0.01",
            "objectives=[{name: clip_infonce}, {name: itg}, {name: mlm}]"])
        torch.manual_seed(0)
        model = build_pretrainer(cfg, V)
        opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        config = deepspeed_config(cfg, 2, False)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
        losses = []
        for step in range(ZERO3_STEPS):
            b = batch()
            b = {k: v for k, v in b.items() if k != "labels"}
            torch.manual_seed(100 * step + rank)  # the same MLM masks for both kernels
            o = engine(b)
            engine.backward(o["loss"])
            engine.step()
            t = o["loss"].detach().double().reshape(1)
            dist.all_reduce(t)
            losses.append(float(t) / 2)
        out[kernels] = losses
    return out


def test_fused_heads_under_zero3_follow_the_naive_trajectory():
    from support.multiproc import run_ranks

    naive, fused = (run_ranks(_zero3_rank, 2)[0][k] for k in ("naive", "torch"))
    assert len(naive) == ZERO3_STEPS and naive[0] > 1.0
    assert naive[-1] < naive[0]  # it trains
    for a, b in zip(fused, naive):
        assert abs(a - b) <= 1e-4 * abs(b), (fused, naive)
