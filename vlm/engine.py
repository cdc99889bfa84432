"""The training engine: DeepSpeed ZeRO around the pure-torch model, run on every rank.

Runs under plain torch.distributed (a launcher has already created the process group, or
there is none and we start a 1-process gloo group). Ray lives in cluster/, never here."""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.reader import ShardReader, list_shards
from vlm import checkpoint
from vlm.config import RunConfig, dump_config
from vlm.data import BatchLoader
from vlm.evaluate import append_eval_log, evaluate_distributed, flat_metrics
from vlm.metrics import TrainMetrics
from vlm.models import build_clip
from vlm.objectives import build_objective
from vlm.pretrain import Pretrainer
from vlm.tokenizer import TextEncoder

NO_DECAY_NAMES = ("logit_scale", "logit_bias", "pos_embed", "cls_token", "positional_embedding")
TOKENIZER_FILE = "tokenizer.json"
TRAIN_LOG = "train_log.jsonl"


def lr_lambda(cfg) -> callable:
    """Linear warmup then cosine decay to min_lr_ratio, as a multiplier of the base lr."""
    o, steps = cfg.optim, cfg.train.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, positional embeddings, the class token, and the
    objectives' temperatures and logit biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: RunConfig, world_size: int, on_gpu: bool) -> dict:
    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and on_gpu)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def ensure_process_group() -> tuple[int, int]:
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    os.environ.setdefault("LOCAL_RANK", "0")
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def forward_flops_per_sample(cfg: RunConfig, vocab_size: int) -> float | None:
    """For model FLOPs utilisation on a GPU; measured on the meta device, costs no memory."""
    from vlm.models.registry import describe

    try:
        return describe(cfg.model, vocab_size)["flops_total"]
    except Exception as e:  # MFU is a nicety: never fail a run over it
        print(f"warning: could not count FLOPs per sample ({e}); no MFU metric", flush=True)
        return None


def build_pretrainer(cfg: RunConfig, vocab_size: int) -> Pretrainer:
    model = build_clip(cfg.model, vocab_size)
    pooled_dim = getattr(model.visual, "pooled_dim", cfg.model.vision.width)
    objectives = [build_objective(o, embed_dim=cfg.model.embed_dim, vision_width=pooled_dim)
                  for o in cfg.objectives]
    return Pretrainer(model, objectives, [o.weight for o in cfg.objectives])


def train(cfg: RunConfig, *, resume: str | None = None) -> dict:
    """Runs cfg.train.steps optimizer steps on this rank. Returns a summary on every rank."""
    import deepspeed  # imported late: it inspects the accelerator at import time

    rank, world_size = ensure_process_group()
    torch.set_num_threads(cfg.train.threads_per_worker)
    seed_everything(cfg.train.seed + rank)
    run_dir = Path(cfg.run_dir)
    on_gpu = torch.cuda.is_available()

    tok_path = run_dir / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} not found: train the tokenizer first (vlm demo does)")
    tokenizer_json = tok_path.read_text()
    text = TextEncoder.from_json(tokenizer_json, cfg.model.text.context_length)

    model = build_pretrainer(cfg, text.vocab_size)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world_size, on_gpu))

    shards = list_shards(cfg.path(cfg.data.train_shards))
    reader = ShardReader(shards, rank=rank, world_size=world_size, seed=cfg.train.seed,
                         shuffle_block=cfg.data.reader.shuffle_block)
    loader = BatchLoader(reader, text, batch_size=cfg.train.micro_batch_size,
                         image_size=cfg.model.vision.image_size, label_field=cfg.data.label_field,
                         views=cfg.data.augment if model.needs_views else None, seed=cfg.train.seed)

    step, samples_seen = 0, 0
    if resume:
        ckpt = checkpoint.resolve(str(run_dir), resume, verify_files=True,
                                  warn=lambda m: print(m, flush=True) if rank == 0 else None)
        state = checkpoint.load(engine, ckpt)
        mine = state["ranks"][rank]
        loader.load_state_dict(mine["reader"])
        checkpoint.set_rng_state(mine["rng"])
        step, samples_seen = state["step"], state["samples_seen"]
        if rank == 0:
            print(f"resumed from {ckpt} at step {step}", flush=True)
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))

    metrics = None
    if cfg.metrics.enabled:
        metrics = TrainMetrics(run=cfg.name, rank=rank, host=cfg.metrics.host, port=cfg.metrics.port,
                               objectives=[o.name for o in cfg.objectives],
                               flops_per_sample=forward_flops_per_sample(cfg, text.vocab_size) if on_gpu else None)
        metrics.write_endpoint(str(run_dir), rank)
        print(f"rank {rank}: Prometheus metrics at {metrics.url}", flush=True)

    def save():
        t0 = time.perf_counter()
        shared = {"step": step, "samples_seen": samples_seen, "config": cfg.model_dump(mode="json"),
                  "tokenizer": tokenizer_json, "world_size": world_size}
        path = checkpoint.save(engine, str(run_dir), step=step, shared_state=shared,
                               rank_state={"reader": loader.state_dict(), "rng": checkpoint.rng_state()})
        if metrics:
            metrics.record_checkpoint(time.perf_counter() - t0)
        if rank == 0:
            print(f"checkpoint {path} ({time.perf_counter() - t0:.2f}s)", flush=True)
            for old in checkpoint.prune(path.parent, cfg.train.keep_checkpoints):
                print(f"removed old checkpoint {old}", flush=True)

    def run_eval():
        # Every rank embeds its share of the eval set; all return the same figures.
        t0 = time.perf_counter()
        results = evaluate_distributed(engine.module.model, text, cfg, rank=rank, world_size=world_size)
        if rank == 0:
            append_eval_log(run_dir, step, results)
            zs = results.get("zeroshot", {})
            print(f"eval at step {step} ({time.perf_counter() - t0:.1f}s): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in flat_metrics(results).items()
                              if k in ("zeroshot/acc1", "linear_probe/linear_probe_acc1", "dense/dense_miou",
                                       "retrieval/text_retrieval_recall@5")) or str(zs), flush=True)
        if metrics:
            metrics.record_eval(results, step=step)

    device = engine.device
    log = open(run_dir / TRAIN_LOG, "a") if rank == 0 else None
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
    last_saved = step
    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            wait = 0.0
            skipped_before = engine.skipped_steps
            for _ in range(cfg.train.grad_accum_steps):
                batch = loader.next_batch()
                wait += loader.last_wait_s
                batch = {k: v.to(device) for k, v in batch.items()}
                out = engine(batch)
                engine.backward(out["loss"])
                engine.step()
            losses = {("total" if k == "loss" else k): v.detach() for k, v in out.items() if "/" not in k}
            diagnostics = {k: float(v) for k, v in out.items() if "/" in k}
            step += 1
            samples_seen += global_batch
            dt = time.perf_counter() - t0
            lr = engine.get_lr()[0]
            if metrics:
                grad_norm = engine.get_global_grad_norm()
                metrics.record_step(step=step, samples=global_batch / world_size, step_s=dt, wait_s=wait, lr=lr,
                                    losses={k: float(v) for k, v in losses.items()},
                                    grad_norm=float(grad_norm) if grad_norm is not None else None,
                                    skipped=engine.skipped_steps > skipped_before, diagnostics=diagnostics)
            if log and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                rec = {"step": step, "samples": samples_seen, "lr": lr, "step_s": dt, "data_wait_s": wait,
                       "samples_per_s": global_batch / dt, **diagnostics,
                       **{f"loss/{k}": float(v) for k, v in losses.items()}}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(f"step {step}/{cfg.train.steps} loss {float(losses['total']):.4f} lr {lr:.2e} "
                      f"{global_batch / dt:.0f} samples/s", flush=True)
            if cfg.eval.every_steps and (step % cfg.eval.every_steps == 0 or step == cfg.train.steps):
                run_eval()
            if step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                save()
                last_saved = step
        if last_saved != step:
            save()
    finally:
        if log:
            log.close()
        if metrics:
            metrics.close()
    return {"step": step, "samples_seen": samples_seen, "rank": rank}
