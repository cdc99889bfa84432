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
EVAL_HEADLINE = ("zeroshot/acc1", "retrieval/text_retrieval_recall@5", "linear_probe/linear_probe_acc1",
                 "dense/dense_miou")
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
    objectives = [build_objective(o, embed_dim=cfg.model.embed_dim, vision_width=pooled_dim, model=model,
                                  vocab_size=vocab_size) for o in cfg.objectives]
    return Pretrainer(model, objectives, [o.weight for o in cfg.objectives])


class Trainer:
    """One rank's run: __init__ builds the engine, the reader and the exporter (and resumes);
    run() takes optimizer steps until cfg.train.steps, logging, evaluating and saving."""

    def __init__(self, cfg: RunConfig, *, resume: str | None = None):
        import deepspeed  # imported late: it inspects the accelerator at import time

        self.cfg = cfg
        self.rank, self.world_size = ensure_process_group()
        torch.set_num_threads(cfg.train.threads_per_worker)
        seed_everything(cfg.train.seed + self.rank)
        self.run_dir = Path(cfg.run_dir)
        self.on_gpu = torch.cuda.is_available()
        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * self.world_size

        tok_path = self.run_dir / TOKENIZER_FILE
        if not tok_path.is_file():
            raise FileNotFoundError(f"{tok_path} not found: train the tokenizer first (vlm demo does)")
        self.tokenizer_json = tok_path.read_text()
        self.text = TextEncoder.from_json(self.tokenizer_json, cfg.model.text.context_length)

        model = build_pretrainer(cfg, self.text.vocab_size)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=cfg.optim.betas, eps=cfg.optim.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=deepspeed_config(cfg, self.world_size, self.on_gpu))
        reader = ShardReader(list_shards(cfg.path(cfg.data.train_shards)), rank=self.rank,
                             world_size=self.world_size, seed=cfg.train.seed,
                             shuffle_block=cfg.data.reader.shuffle_block)
        self.loader = BatchLoader(reader, self.text, batch_size=cfg.train.micro_batch_size,
                                  image_size=cfg.model.vision.image_size, label_field=cfg.data.label_field,
                                  views=cfg.data.augment if model.needs_views else None, seed=cfg.train.seed)
        self.step, self.samples_seen = 0, 0
        if resume:
            self._resume(resume)
        elif self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        self.metrics = self._start_metrics() if cfg.metrics.enabled else None

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _resume(self, tag: str) -> None:
        ckpt = checkpoint.resolve(str(self.run_dir), tag, verify_files=True, warn=self._say)
        state = checkpoint.load(self.engine, ckpt)
        mine = state["ranks"][self.rank]
        self.loader.load_state_dict(mine["reader"])
        checkpoint.set_rng_state(mine["rng"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self._say(f"resumed from {ckpt} at step {self.step}")

    def _start_metrics(self) -> TrainMetrics:
        cfg = self.cfg
        flops = forward_flops_per_sample(cfg, self.text.vocab_size) if self.on_gpu else None
        metrics = TrainMetrics(run=cfg.name, rank=self.rank, host=cfg.metrics.host, port=cfg.metrics.port,
                               objectives=[o.name for o in cfg.objectives], flops_per_sample=flops)
        metrics.write_endpoint(str(self.run_dir), self.rank)
        print(f"rank {self.rank}: Prometheus metrics at {metrics.url}", flush=True)
        return metrics

    def train_step(self) -> dict:
        """One optimizer step (grad_accum_steps micro-batches); returns what to record."""
        t0 = time.perf_counter()
        wait, skipped_before = 0.0, self.engine.skipped_steps
        for _ in range(self.cfg.train.grad_accum_steps):
            batch = self.loader.next_batch()
            wait += self.loader.last_wait_s
            out = self.engine({k: v.to(self.engine.device) for k, v in batch.items()})
            self.engine.backward(out["loss"])
            self.engine.step()
        self.step += 1
        self.samples_seen += self.global_batch
        grad_norm = self.engine.get_global_grad_norm()
        return {"losses": {("total" if k == "loss" else k): float(v.detach()) for k, v in out.items() if "/" not in k},
                "diagnostics": {k: float(v) for k, v in out.items() if "/" in k},
                "step_s": time.perf_counter() - t0, "wait_s": wait, "lr": self.engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "skipped": self.engine.skipped_steps > skipped_before}

    def record(self, r: dict, log) -> None:
        if self.metrics:
            self.metrics.record_step(step=self.step, samples=self.global_batch / self.world_size, **r)
        last = self.step == self.cfg.train.steps
        if log is None or not (self.step % self.cfg.train.log_every == 0 or last):
            return
        rate = self.global_batch / r["step_s"]
        rec = {"step": self.step, "samples": self.samples_seen, "lr": r["lr"], "step_s": r["step_s"],
               "data_wait_s": r["wait_s"], "samples_per_s": rate, "grad_norm": r["grad_norm"],
               **r["diagnostics"], **{f"loss/{k}": v for k, v in r["losses"].items()}}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(f"step {self.step}/{self.cfg.train.steps} loss {r['losses']['total']:.4f} lr {r['lr']:.2e} "
              f"{rate:.0f} samples/s", flush=True)

    def save(self) -> None:
        """Collective. Training stalls for the duration, exported as vlm_checkpoint_save_duration_seconds."""
        t0 = time.perf_counter()
        shared = {"step": self.step, "samples_seen": self.samples_seen, "config": self.cfg.model_dump(mode="json"),
                  "tokenizer": self.tokenizer_json, "world_size": self.world_size}
        path = checkpoint.save(self.engine, str(self.run_dir), step=self.step, shared_state=shared,
                               rank_state={"reader": self.loader.state_dict(), "rng": checkpoint.rng_state()})
        if self.metrics:
            self.metrics.record_checkpoint(time.perf_counter() - t0)
        self._say(f"checkpoint {path} ({time.perf_counter() - t0:.2f}s)")
        if self.rank == 0:
            for old in checkpoint.prune(path.parent, self.cfg.train.keep_checkpoints):
                self._say(f"removed old checkpoint {old}")

    def evaluate(self) -> None:
        """Collective: every rank embeds its share of the eval set; all get the same figures."""
        t0 = time.perf_counter()
        results = evaluate_distributed(self.engine.module.model, self.text, self.cfg, rank=self.rank,
                                       world_size=self.world_size)
        if self.rank == 0:
            append_eval_log(self.run_dir, self.step, results)
        headline = {k: v for k, v in flat_metrics(results).items() if k in EVAL_HEADLINE}
        self._say(f"eval at step {self.step} ({time.perf_counter() - t0:.1f}s): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in headline.items()))
        if self.metrics:
            self.metrics.record_eval(results, step=self.step)

    def run(self) -> dict:
        cfg = self.cfg
        log = open(self.run_dir / TRAIN_LOG, "a") if self.rank == 0 else None
        last_saved = self.step
        try:
            while self.step < cfg.train.steps:
                self.record(self.train_step(), log)
                if cfg.eval.every_steps and (self.step % cfg.eval.every_steps == 0 or self.step == cfg.train.steps):
                    self.evaluate()
                if self.step % cfg.train.checkpoint_every == 0 and self.step < cfg.train.steps:
                    self.save()
                    last_saved = self.step
            if last_saved != self.step:
                self.save()
        finally:
            if log:
                log.close()
            if self.metrics:
                self.metrics.close()
        return {"step": self.step, "samples_seen": self.samples_seen, "rank": self.rank}


def train(cfg: RunConfig, *, resume: str | None = None) -> dict:
    """Runs cfg.train.steps optimizer steps on this rank. Returns a summary on every rank."""
    return Trainer(cfg, resume=resume).run()
