"""The Trainer: one rank's run of DeepSpeed ZeRO around the pure-torch model (steps, save, resume, stop).

Runs under plain torch.distributed (a launcher has already created the process group, or
there is none and we start a 1-process gloo group). Ray lives in cluster/, never here."""
from __future__ import annotations

import faulthandler
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

# before deepspeed is imported (it picks its accelerator then): a GPU when torch sees one
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
import torch.distributed as dist

from vlm import rundir
from vlm.checkpoint import discover, layout, resolve, rng, safeload, store
from vlm.train import gradcache
from vlm.config import RunConfig, dump_config
from vlm.config_changes import check_resume_config
from vlm.data.batches import BadDataError
from vlm.eval.runner import EVAL_LOG, append_eval_log, evaluate_distributed, flat_metrics
from vlm.observe.metrics import TrainMetrics
from vlm.train.deepspeed_config import deepspeed_config
from vlm.train.elastic import resize_line
from vlm.train.init_from import apply_init_from
from vlm.train.loading import build_loader
from vlm.train.module import build_pretrainer
from vlm.train.optim import build_optimizer
from vlm.train.rendezvous import ensure_process_group
from vlm.train.sample_ids import SampleIdLog
from vlm.train.steplog import TRAIN_LOG, bad_sample_totals, floats, truncate_log, write_step
from vlm.train.stop import StopSignals, leave_process
from vlm.train.universal import to_universal
from vlm.data.tokenizer import load_run_tokenizer

EVAL_HEADLINE = ("zeroshot/acc1", "retrieval/text_retrieval_recall@5", "linear_probe/linear_probe_acc1",
                 "dense/dense_miou")


def forward_flops_per_sample(cfg: RunConfig, vocab_size: int) -> float | None:
    """For model FLOPs utilisation on a GPU; measured on the meta device, costs no memory."""
    from vlm.models.registry import describe

    try:
        return describe(cfg.model, vocab_size)["flops_total"]
    except Exception as e:  # MFU is a nicety: never fail a run over it
        print(f"warning: could not count FLOPs per sample ({e}); no MFU metric", flush=True)
        return None


class Trainer:
    """One rank's run: __init__ builds the engine, the reader and the exporter (and resumes);
    run() takes optimizer steps until cfg.train.steps, logging, evaluating and saving."""

    def __init__(self, cfg: RunConfig, *, resume: str | None = None,
                 should_stop: Callable[[], bool] | None = None):
        """resume: None (a fresh run), 'auto' (the newest complete checkpoint when there is
        one, else a fresh run: what a restarted worker group or a resubmitted job wants),
        'latest', a tag or a path. should_stop: polled once per step by rank 0 (one read
        per step for the whole run, not one per worker); like a SIGTERM on any rank, a True
        makes every rank save and stop (the Ray job launcher's stop request reaches the
        workers through it)."""
        import deepspeed  # imported late: it inspects the accelerator at import time

        self.cfg = cfg
        self.rank, self.world_size = ensure_process_group()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.set_num_threads(cfg.train.threads_per_worker)
        rng.seed_everything(cfg.train.seed + self.rank)
        self.run_dir, self.scratch = cfg.run_dir, rundir.scratch_dir(cfg.run_dir)  # a path or URL; local scratch
        self.ckpt_root = cfg.path(cfg.train.checkpoint_dir)
        self.on_gpu = torch.cuda.is_available()
        self.accum = cfg.train.accum_steps(self.world_size)
        self.global_batch = cfg.train.micro_batch_size * self.accum * self.world_size
        self.stop_requested, self.stop_reason, self.should_stop = False, "", should_stop
        self.signals: list[int] = []  # signals received by this process (main thread only)
        self.stop_signal: int | None = None  # the signal that stopped the run, on any rank
        # the tag saved last; rank 0's step log (a RunLog) and the sample-id log, opened in run()
        self.last_checkpoint, self.log, self.ids = None, None, None

        self.tokenizer_json, self.text = load_run_tokenizer(self.run_dir, cfg.model.text.context_length)
        model = build_pretrainer(cfg, self.text.vocab_size)
        if cfg.train.grad_cache and not model.coupled:
            raise ValueError("train.grad_cache is on but no objective is batch-coupled "
                             f"({', '.join(o.name for o in cfg.objectives)}): turn it off")
        if resume == "auto":
            found = self.rank == 0 and discover.has_checkpoint(self.ckpt_root)
            resume = "latest" if self._broadcast(found) else None
        ckpt, state = self._locate(resume) if resume else (None, None)
        for line in apply_init_from(model, cfg) if cfg.model.init_from and not resume else ():
            self._say(line)
        universal = (state is not None and state["world_size"] != self.world_size and cfg.train.zero_stage > 0)
        optimizer, scheduler = build_optimizer(cfg, model)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.world_size, self.on_gpu, load_universal=universal))
        self.loader = build_loader(cfg, self.text, model, rank=self.rank, world_size=self.world_size,
                                   device=self.engine.device)
        self._say(f"data: {self.loader.num_workers} loader worker(s) per rank"
                  + (" (in the training process)" if not self.loader.num_workers else ""))
        self.step, self.samples_seen = 0, 0
        self._read_once = False  # record(): whether a step's losses were read yet
        if resume:
            self._restore(self._to_universal(ckpt, state) if universal else ckpt, state)
        elif self.rank == 0:
            rundir.write_text(rundir.join(self.run_dir, "config.yaml"), dump_config(cfg))
        self.metrics = self._start_metrics() if cfg.metrics.enabled else None

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _broadcast(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _locate(self, resume: str) -> tuple[Path, dict]:
        """--resume latest|TAG|PATH -> (a verified local checkpoint dir, its trainer state).
        Rank 0 resolves and tells the others, so every rank loads the same checkpoint even when
        it falls back; a remote one is downloaded into {scratch}/.ckpt_cache on every node."""
        cache, found = self.scratch / ".ckpt_cache", (None, None, None)
        if self.rank == 0:
            try:
                p = resolve.locate(resume, self.ckpt_root, cache=cache, warn=self._say)
                url = resume.rstrip("/").rsplit("/", 1)[0] if layout.is_remote(resume) else self.ckpt_root
                found = (str(p), None, url if p.parent == cache else None)
            except (FileNotFoundError, ValueError) as e:
                found = (None, str(e), None)
        path, error, url = self._broadcast(found)
        if error:
            raise FileNotFoundError(error)
        if url is not None:  # downloaded: each node gets its own copy (no shared file system needed)
            path = str(cache / Path(path).name)
            if self.local_rank == 0 and self.rank != 0:
                resolve.fetch_remote(url, Path(path).name, cache, warn=self._say)
            self._broadcast(None)  # a barrier: a node's copy is whole before its ranks read it
        state = safeload.load_trainer_state(Path(path))
        check_resume_config(state.get("config"), self.cfg, checkpoint=path)  # every rank: all stop together
        return Path(path), state

    def _to_universal(self, ckpt: Path, state: dict) -> Path:
        """A ZeRO checkpoint saved at another world size -> DeepSpeed's universal format
        (converted once per node, cached beside the run), which it loads at any size."""
        out = self.scratch / ".universal" / ckpt.name
        if self.local_rank == 0 and not (out / "zero").is_dir():
            self._say(f"checkpoint {ckpt.name} was saved by {state['world_size']} worker(s), this run has "
                      f"{self.world_size}: converting it to DeepSpeed's universal format in {out}")
            to_universal(ckpt, out)
        if self.world_size > 1:
            dist.barrier()
        return out

    def _restore(self, ckpt: Path, state: dict) -> None:
        safeload.check_files(ckpt)  # every rank, before DeepSpeed opens anything (a cached universal copy too)
        with safeload.weights_only_loads():
            load_path, _ = self.engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {ckpt}")
        ranks = state["ranks"]
        self.loader.load_rank_states([r["reader"] for r in ranks])  # exact, or re-split at a new layout
        if state["world_size"] == self.world_size:
            rng.set_rng_state(ranks[self.rank]["rng"])
        else:
            rng.seed_everything(hash((self.cfg.train.seed, self.rank, state["step"])) & 0xFFFF_FFFF)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        if (resized := resize_line(state, self.cfg, self.world_size)) is not None:
            self._say(resized)
        self._say(f"resumed from {ckpt} at step {self.step} (saved by {state['world_size']} worker(s)); "
                  f"optimizer state restored (Adam step {self._optimizer_steps()})")

    def _optimizer_steps(self) -> int:
        """Adam's step count in the (possibly ZeRO-wrapped) optimizer: 0 for a fresh one."""
        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        steps = [int(st["step"]) for st in getattr(inner, "state", {}).values() if "step" in st]
        return max(steps, default=0)

    def _start_metrics(self) -> TrainMetrics:
        cfg = self.cfg
        flops = forward_flops_per_sample(cfg, self.text.vocab_size) if self.on_gpu else None
        metrics = TrainMetrics(run=cfg.name, rank=self.rank, host=cfg.metrics.host, port=cfg.metrics.port,
                               objectives=[o.name for o in cfg.objectives], flops_per_sample=flops,
                               world_size=self.world_size)
        metrics.write_endpoint(self.run_dir, self.rank)
        print(f"rank {self.rank}: Prometheus metrics at {metrics.url}", flush=True)
        return metrics

    def train_step(self) -> dict:
        """One optimizer step (self.accum micro-batches per rank); returns what to record.
        Losses are the step's: averaged over micro-batches (with the gradient cache, the
        coupled ones are computed once on the global batch), kept as tensors on the device:
        nothing here waits for the device (record reads them on the steps it logs)."""
        t0 = time.perf_counter()
        wait, skipped_before, bad = 0.0, self.engine.skipped_steps, Counter()
        if self.cfg.train.grad_cache:
            batches = []
            for _ in range(self.accum):
                batches.append(self.loader.next_batch())
                wait += self.loader.last_wait_s
                bad.update(self.loader.last_bad)
            r = gradcache.cached_step(self.engine, batches)
            self.engine.step()
            losses, diagnostics = {"total": r["total"], **r["losses"]}, r["diagnostics"]
        else:
            losses, diagnostics = {}, {}
            for _ in range(self.accum):
                batch = self.loader.next_batch()
                wait += self.loader.last_wait_s
                bad.update(self.loader.last_bad)
                out = self.engine(batch)
                self.engine.backward(out["loss"])
                self.engine.step()
                for k, v in out.items():
                    if "/" in k:
                        diagnostics[k] = v.detach() if isinstance(v, torch.Tensor) else v
                    else:
                        name = "total" if k == "loss" else k
                        losses[name] = losses.get(name, 0.0) + v.detach() / self.accum
        self.step += 1
        self.samples_seen += self.global_batch
        return {"losses": losses, "diagnostics": diagnostics,
                "step_s": time.perf_counter() - t0, "wait_s": wait, "lr": self.engine.get_lr()[0],
                "grad_norm": self.engine.get_global_grad_norm(),
                "skipped": self.engine.skipped_steps > skipped_before, "bad_samples": dict(bad)}

    def record(self, r: dict, log) -> None:
        """Exports the step's metrics; on the steps train.log_every picks, the last and this
        process's first, also reads its losses from the device, exports (and logs) them."""
        last = self.step == self.cfg.train.steps
        logged = self.step % self.cfg.train.log_every == 0 or last
        if logged or not self._read_once:  # the first step too: the loss gauge is never left unset
            self._read_once = True
            r = {**r, "losses": floats(r["losses"]), "diagnostics": floats(r["diagnostics"]),
                 "grad_norm": None if r["grad_norm"] is None else float(r["grad_norm"])}
        else:
            r = {**r, "losses": {}, "diagnostics": {}, "grad_norm": None}
        if self.metrics:
            self.metrics.record_step(step=self.step, samples=self.global_batch / self.world_size, **r)
        if self.ids is not None:
            self.ids.write(self.step)
        if not logged:
            return
        # collective: every rank logs on the same steps
        bad = bad_sample_totals(self.loader.bad_counts, self.world_size)
        if log is not None:
            write_step(log, r, step=self.step, steps=self.cfg.train.steps, samples_seen=self.samples_seen,
                       global_batch=self.global_batch, bad=bad)

    def save(self) -> None:
        """Collective. Training stalls for the duration, exported as
        vlm_checkpoint_save_duration_seconds and printed."""
        t0 = time.perf_counter()
        for log in (self.log, self.ids):  # a remote log is uploaded before every checkpoint: no gap on resume
            if log is not None:
                log.sync()
        shared = store.shared_state(step=self.step, samples_seen=self.samples_seen,
                                    config=self.cfg.model_dump(mode="json"), tokenizer=self.tokenizer_json,
                                    world_size=self.world_size, zero_stage=self.cfg.train.zero_stage)
        path = store.save(self.engine, self.ckpt_root, step=self.step, shared_state=shared,
                          rank_state=store.rank_state(self.loader.state_dict()),
                          staging=self.scratch / ".ckpt_staging")
        stall = time.perf_counter() - t0
        self.last_checkpoint = layout.tag_for_step(self.step)
        if self.metrics:
            self.metrics.record_checkpoint(stall)
        self._say(f"checkpoint {path} (training stalled {stall:.2f}s)")
        if self.rank == 0:
            keep = self.cfg.train.keep_checkpoints
            removed = (store.prune_remote(self.ckpt_root, keep) if layout.is_remote(self.ckpt_root)
                       else store.prune(Path(self.ckpt_root), keep))
            for old in removed:
                self._say(f"removed old checkpoint {old}")

    def _on_sigterm(self, signum, frame) -> None:
        """SIGTERM or SIGINT: flags only; the loop saves at the end of the step, and
        vlm.train.stop.watch_grace ends the process on a second signal or when the grace period is over."""
        self.signals.append(signum)
        self.stop_requested, self.stop_reason = True, signal.Signals(signum).name

    def _agree_to_stop(self) -> bool:
        """Whether any rank was asked to stop (SIGTERM, SIGINT, should_stop): all ranks must
        save together. The flag carries the signal's number, so that every rank, signalled or
        not, knows it (for its exit status)."""
        if self.should_stop is not None and self.rank == 0 and not self.stop_requested and self.should_stop():
            self.stop_requested, self.stop_reason = True, "the job was asked to stop"
        flag = torch.tensor([float(self.signals[0]) if self.signals else 1.0 if self.stop_requested else 0.0])
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 1:
            self.stop_signal = int(flag.item())
        return bool(flag.item())

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
        """Steps until cfg.train.steps; on SIGTERM or SIGINT (a preemption, Ctrl-C, `kill`)
        every rank finishes its step, a checkpoint is saved and the run ends early
        ("stopped"). The logs first lose any rows past the step this run starts from (a
        resumed or restarted run logs those steps again)."""
        cfg = self.cfg
        if self.rank == 0:
            for name in (TRAIN_LOG, EVAL_LOG):
                truncate_log(rundir.join(self.run_dir, name), self.step)
        log = self.log = rundir.open_log(self.run_dir, TRAIN_LOG) if self.rank == 0 else None
        if cfg.data.log_sample_ids:
            self.ids = SampleIdLog(self.run_dir, self.loader, rank=self.rank, world_size=self.world_size,
                                   step=self.step)
        last_saved, stopped = self.step, False
        signals = StopSignals(self._on_sigterm, cfg.train.stop_grace_s, self.rank).install()
        try:
            while self.step < cfg.train.steps:
                self.record(self.train_step(), log)
                if cfg.eval.every_steps and (self.step % cfg.eval.every_steps == 0 or self.step == cfg.train.steps):
                    self.evaluate()
                if self._agree_to_stop():
                    self._say(f"stop requested ({self.stop_reason or 'by another worker'}): saving at step {self.step}")
                    stopped = True
                    break
                if self.step % cfg.train.checkpoint_every == 0 and self.step < cfg.train.steps:
                    self.save()
                    last_saved = self.step
            if last_saved != self.step:
                self.save()
        finally:
            self.loader.close()
            signals.release()
            for f in (log, self.ids):
                if f is not None:
                    f.close()
            if self.metrics:
                self.metrics.close()
        return {"step": self.step, "samples_seen": self.samples_seen, "rank": self.rank, "stopped": stopped,
                "checkpoint": self.last_checkpoint, "signal": self.stop_signal}


def train(cfg: RunConfig, *, resume: str | None = None, should_stop: Callable[[], bool] | None = None,
          on_started: Callable[[], None] | None = None) -> dict:
    """Runs cfg.train.steps optimizer steps on this rank. Returns a summary on every rank
    (step, stopped, the tag of the last checkpoint it saved, the signal that stopped it).
    on_started: called once the engine is built and any checkpoint restored."""
    trainer = Trainer(cfg, resume=resume, should_stop=should_stop)
    if on_started is not None:
        on_started()
    return trainer.run()


def main(argv: list[str] | None = None) -> int:
    """One rank of a run without Ray: under torchrun (or any launcher setting RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or alone as a single process."""
    import argparse

    from vlm.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m vlm.train.trainer", description=main.__doc__)
    ap.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable)")
    ap.add_argument("--resume", metavar="auto|latest|TAG|PATH",
                    help="continue from a checkpoint (auto: the newest one if there is one, else start)")
    args = ap.parse_args(argv)
    faulthandler.enable()  # a native crash (SIGABRT, SIGSEGV) prints every thread's Python stack
    try:
        summary = train(load_config(args.config, args.overrides), resume=args.resume)
    except BadDataError as e:  # mostly broken shards: say which, no traceback
        print(f"python -m vlm.train.trainer: error: {e}", flush=True)
        return 1
    except ConfigError as e:  # a bad config, or a resume whose config changed keys the checkpoint fixes
        print(f"python -m vlm.train.trainer: {e}", flush=True)
        return 2
    status = 0
    if summary["stopped"] and summary["signal"] is not None:
        if summary["rank"] == 0:
            print(f"stopped at step {summary['step']}; checkpoint {summary['checkpoint']}", flush=True)
        status = 128 + summary["signal"]
    leave_process(status)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
