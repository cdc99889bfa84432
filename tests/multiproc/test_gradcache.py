"""The gradient cache and the DeepSpeed engine against plain torch, on 2 gloo workers.

One spawn of two processes runs, for each ZeRO stage, (a) one step's gradients with the
cache at global batch 64 in 8 micro-batches (4 per rank), (b) 10 optimizer steps of the
engine without the cache and (c) with it; the test process computes the same in a single
plain-torch process on the whole batch (AdamW, the same parameter groups and schedule,
gradient clipping at 1.0 as DeepSpeed does) and compares. A second run with dropout and
drop-path on checks that each micro-batch's replay reproduces its no-grad embeddings
bitwise."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from vlm.config import load_config
from support.ports import free_port

pytestmark = pytest.mark.e2e

GLOBAL, MICRO, WORLD, STEPS = 64, 8, 2, 10
VOCAB = 300
TINY = ["model.embed_dim=16", "model.vision.image_size=16", "model.vision.patch_size=4", "model.vision.width=32",
        "model.vision.depth=2", "model.vision.heads=2", "model.text.width=32", "model.text.depth=1",
        "model.text.heads=2", "model.text.context_length=8", "data.ingest.image_size=16",
        "optim.warmup_steps=3", f"train.steps={STEPS}", "optim.lr=0.01"]


def make_cfg(stage: int, *, accum: int, grad_cache: bool, dropout: float = 0.0, micro: int = MICRO):
    return load_config(None, [*TINY, f"train.zero_stage={stage}", f"train.micro_batch_size={micro}",
                              f"train.grad_accum_steps={accum}", f"train.grad_cache={grad_cache}",
                              f"model.dropout={dropout}", f"model.drop_path={dropout}"])


def global_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(1, VOCAB, (GLOBAL, 8), generator=g)
    eot = torch.randint(2, 8, (GLOBAL,), generator=g)
    return {"images": torch.randn(GLOBAL, 3, 16, 16, generator=g), "tokens": tokens, "eot_index": eot}


def micro_batches(step: int, rank: int, world: int, micro: int = MICRO) -> list[dict]:
    batch = global_batch(step)
    per_rank = GLOBAL // world
    mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
    return [{k: v[i:i + micro] for k, v in mine.items()} for i in range(0, per_rank, micro)]


def build(cfg):
    from vlm.train.module import build_pretrainer

    torch.manual_seed(0)
    return build_pretrainer(cfg, VOCAB)


def make_engine(cfg, world: int):
    import deepspeed

    from vlm.train.deepspeed_config import deepspeed_config
    from vlm.train.optim import lr_lambda, param_groups

    model = build(cfg)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    config = deepspeed_config(cfg, world, False)
    # partition every parameter under ZeRO-3, however small (by default tiny ones stay whole)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


def full_grads(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}


def worker(rank: int, port: int, stages: list[int], out: str) -> None:
    import torch.distributed as dist

    from vlm.train import gradcache

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    accum = GLOBAL // WORLD // MICRO
    result = {}
    for stage in stages:
        # (a) one step's gradients with the cache
        engine = make_engine(make_cfg(stage, accum=accum, grad_cache=True), WORLD)
        gradcache.cached_step(engine, micro_batches(0, rank, WORLD))
        result[(stage, "grads")] = full_grads(engine)
        engine.step()
        # (b), (c) loss trajectories: plain (one micro-batch of 32 per rank: the contrastive
        # batch is what fits) and cached (4 micro-batches of 8 per rank, the same global batch)
        for cached in (False, True):
            micro = MICRO if cached else GLOBAL // WORLD
            engine = make_engine(make_cfg(stage, accum=GLOBAL // WORLD // micro, grad_cache=cached, micro=micro),
                                 WORLD)
            losses = []
            for step in range(STEPS):
                batches = micro_batches(step, rank, WORLD, micro)
                if cached:
                    loss = gradcache.cached_step(engine, batches)["total"]
                    engine.step()
                else:
                    loss = 0.0
                    for b in batches:
                        o = engine(b)
                        engine.backward(o["loss"])
                        engine.step()
                        loss += float(o["loss"]) / len(batches)
                t = torch.tensor([loss], dtype=torch.float64)
                dist.all_reduce(t)
                losses.append(float(t) / WORLD)
            result[(stage, "cached" if cached else "plain")] = losses
    # dropout and drop-path: the replay reproduces the no-grad embeddings bitwise
    engine = make_engine(make_cfg(0, accum=accum, grad_cache=True, dropout=0.2), WORLD)
    r = gradcache.cached_step(engine, micro_batches(0, rank, WORLD), keep_embeddings=True)
    engine.step()
    result["replay_equal"] = all(torch.equal(a[k], b[k]) for a, b in zip(r["embed"], r["replay"]) for k in a)
    engine = make_engine(make_cfg(0, accum=accum, grad_cache=True, dropout=0.2), WORLD)
    with torch.no_grad():  # and dropout is really on: two passes of one micro-batch differ
        b = micro_batches(0, rank, WORLD)[0]
        result["dropout_active"] = not torch.equal(engine(b, mode="embed")["image_embed"],
                                                   engine(b, mode="embed")["image_embed"])
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()


def reference(cfg) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Plain torch, one process, the whole batch: step-0 gradients and the loss trajectory."""
    from vlm.train.optim import lr_lambda, param_groups

    model = build(cfg)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    grads, losses = None, []
    for step in range(STEPS):
        opt.zero_grad()
        loss = model(global_batch(step))["loss"]
        loss.backward()
        if grads is None:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return grads, losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gc") / "result.pt")
    mp.start_processes(worker, args=(free_port(), [0, 1, 2, 3], out), nprocs=WORLD, start_method="spawn")
    from vlm.checkpoint.safeload import load

    return load(out)  # tensors and plain data: weights_only, like every file the project reads


@pytest.fixture(scope="module")
def ref():
    torch.set_num_threads(1)
    return reference(make_cfg(0, accum=1, grad_cache=False))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_cached_gradients_equal_the_full_batch_gradients(runs, ref, stage):
    grads, ref_grads = runs[(stage, "grads")], ref[0]
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        err = (g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)
        assert err < 1e-5, f"ZeRO-{stage} {name}: relative error {err:.2e}"
    # the temperature gets its gradient too (from the last micro-batch's replay)
    assert ref_grads["objectives.0.logit_scale"].abs().sum() > 0


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("mode", ["plain", "cached"])
def test_loss_trajectory_equals_plain_torch(runs, ref, stage, mode):
    ours, theirs = runs[(stage, mode)], ref[1]
    assert len(ours) == STEPS
    assert theirs[-1] < theirs[0] - 0.1  # it trains: the comparison is not between constants
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"ZeRO-{stage} {mode} step {step}: {a} vs {b}"


def test_replay_reproduces_dropout_and_drop_path_bitwise(runs):
    assert runs["dropout_active"], "dropout was not active: the bitwise check would prove nothing"
    assert runs["replay_equal"]
