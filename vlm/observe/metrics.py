"""Prometheus exporter of one training worker.

Names follow DESIGN.md: `vlm_` prefix, base units, counters end in `_total`, labels
bounded to run/rank/objective (and task/metric for evaluation figures, reason for bad
samples, whose values come from code, never from data). Each worker announces itself as a Prometheus file_sd target
in `{run_dir}/metrics/targets/`, so one config finds every worker of a run.

The engine calls one method per event: `record_step` after every optimizer step,
`record_checkpoint` after a save, `record_eval` after an evaluation."""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from data_pipeline.metrics import SD_DIR_ENV, Exporter, target_address, write_sd_target

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CKPT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TARGETS_DIR = "targets"  # under {run_dir}/metrics/
MAX_EVAL_SERIES = 64  # a cap on vlm_eval_metric's label pairs, whatever results look like
# Dense bf16 peak FLOP/s per device, from the vendors' data sheets; the first name that
# occurs in torch.cuda.get_device_name() wins. Pass peak_flops for anything else.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
# Why the training loader skipped a sample (vlm.data.batches.check_sample): the bounded reason
# label of vlm_train_bad_samples_total
BAD_REASONS = ("no_image", "decode_error", "too_many_pixels", "no_caption", "bad_caption", "bad_metadata")


def resident_memory_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is the best the standard library offers
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_flops_of(device_name: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS:
        if name in device_name:
            return flops
    return None


def eval_figures(results: Mapping) -> list[tuple[str, str, float]]:
    """(task, metric, value) for every finite number in evaluation results: nested
    `{"zeroshot": {"acc1": ..}}` and flat `{"zeroshot/acc1": ..}` both give task
    "zeroshot"; any other top-level number gets task "summary"; "step" and "time" are
    bookkeeping, not figures."""
    out = []
    for key, value in results.items():
        if key in ("step", "time"):
            continue
        if isinstance(value, Mapping):
            out += [(str(key), str(k), float(v)) for k, v in value.items() if _is_number(v)]
        elif _is_number(value):
            task, _, metric = str(key).rpartition("/")
            out.append((task or "summary", metric, float(value)))
    return [f for f in out if math.isfinite(f[2])][:MAX_EVAL_SERIES]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class TrainMetrics(Exporter):
    """Serves this worker's metrics on host:(port + rank), or any free port when port is 0
    or taken, until close().

    flops_per_sample: forward FLOPs of one sample (`vlm model info`); with a GPU whose
    peak is known (or peak_flops), model FLOPs utilisation is exported, counting a
    training step as 3x the forward pass."""

    def __init__(self, *, run: str, rank: int, host: str, port: int, objectives: list[str],
                 flops_per_sample: float | None = None, peak_flops: float | None = None, world_size: int = 1):
        self.registry = r = CollectorRegistry()
        labels = ["run", "rank"]
        self._samples = Counter("vlm_train_samples_total", "Training samples consumed", labels, registry=r)
        self._steps = Counter("vlm_train_steps_total", "Optimizer steps taken", labels, registry=r)
        self._skipped = Counter("vlm_train_skipped_steps_total", "Steps whose update was skipped "
                                "(non-finite gradients)", labels, registry=r)
        self._bad = Counter("vlm_train_bad_samples_total", "Training samples skipped as bad, by reason "
                            f"({', '.join(BAD_REASONS)})", labels + ["reason"], registry=r)
        self._step = Gauge("vlm_train_step", "Current optimizer step of the run (continues across "
                           "resumes)", labels, registry=r)
        self._loss = Gauge("vlm_train_loss", "Latest loss by objective (total = weighted sum)",
                           labels + ["objective"], registry=r)
        self._temperature = Gauge("vlm_train_temperature", "Softmax/sigmoid temperature by objective",
                                  labels + ["objective"], registry=r)
        self._lr = Gauge("vlm_train_learning_rate", "Current learning rate", labels, registry=r)
        self._grad_norm = Gauge("vlm_train_grad_norm", "Global gradient norm before clipping", labels, registry=r)
        self._step_s = Histogram("vlm_train_step_duration_seconds", "Wall time of one optimizer step",
                                 labels, buckets=STEP_BUCKETS, registry=r)
        self._wait_s = Histogram("vlm_train_data_wait_seconds", "Time a step waited for its batch",
                                 labels, buckets=STEP_BUCKETS, registry=r)
        self._throughput = Gauge("vlm_train_samples_per_second", "This rank's samples per second over "
                                 "the last step", labels, registry=r)
        self._last_step = Gauge("vlm_train_last_step_timestamp_seconds", "Unix time the last step finished "
                                "(the worker's start before the first)", labels, registry=r)
        self._ckpt_s = Histogram("vlm_checkpoint_save_duration_seconds", "Time training stalled on a save",
                                 labels, buckets=CKPT_BUCKETS, registry=r)
        self._ckpt_ok = Gauge("vlm_checkpoint_last_success_timestamp_seconds", "Unix time of this worker's "
                              "last successful save (its start before the first)", labels, registry=r)
        self._ckpt_failed = Counter("vlm_checkpoint_failures_total", "Saves that raised", labels, registry=r)
        self._world = Gauge("vlm_train_world_size", "Workers (ranks) of the run; a change is an elastic "
                            "resize (train.num_workers [min, max])", labels, registry=r)
        self._started = Gauge("vlm_worker_start_time_seconds", "Unix time this worker process started "
                              "training; a change means the worker restarted", labels, registry=r)
        self._rss = Gauge("vlm_process_resident_memory_bytes", "Resident memory of the worker process",
                          labels, registry=r)
        self._eval = Gauge("vlm_eval_metric", "Latest evaluation figure by task and metric",
                           labels + ["task", "metric"], registry=r)
        self._eval_step = Gauge("vlm_eval_step", "Training step of the latest evaluation", labels, registry=r)
        self._eval_time = Gauge("vlm_eval_last_timestamp_seconds", "Unix time of the latest evaluation",
                                labels, registry=r)
        self.run, self.rank = run, rank
        self._lv = lv = (run, str(rank))
        now = time.time()
        self._started.labels(*lv).set(now)
        self._world.labels(*lv).set(world_size)
        self._last_step.labels(*lv).set(now)
        self._ckpt_ok.labels(*lv).set(now)
        self._rss.labels(*lv).set_function(resident_memory_bytes)
        for metric in (self._skipped, self._ckpt_failed, self._eval_step, self._eval_time, self._grad_norm):
            metric.labels(*lv)
        for name in [*objectives, "total"]:  # present from the first scrape, before step 1
            self._loss.labels(*lv, name)
        for reason in BAD_REASONS:
            self._bad.labels(*lv, reason)
        self._mfu = self._add_gpu_metrics(flops_per_sample, peak_flops)

        self._serve(self.registry, host, port + rank if port else 0)
        self._remote_sd: str | None = None  # the target at a remote run_dir (write_endpoint)

    def _add_gpu_metrics(self, flops_per_sample, peak_flops):
        """GPU memory gauges when CUDA is present; returns the MFU gauge child or None."""
        import torch

        if not torch.cuda.is_available():
            return None
        r, lv = self.registry, self._lv
        Gauge("vlm_gpu_memory_allocated_bytes", "GPU memory held by tensors", ["run", "rank"],
              registry=r).labels(*lv).set_function(lambda: torch.cuda.memory_allocated())
        Gauge("vlm_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator",
              ["run", "rank"], registry=r).labels(*lv).set_function(lambda: torch.cuda.memory_reserved())
        peak = peak_flops or peak_flops_of(torch.cuda.get_device_name())
        if not (flops_per_sample and peak):
            return None
        self._train_flops_per_sample, self._peak_flops = 3.0 * flops_per_sample, peak
        return Gauge("vlm_train_model_flops_utilization_ratio", "Model FLOPs per second over the device's "
                     "peak (training step = 3x forward)", ["run", "rank"], registry=r).labels(*lv)

    # ------------------------------------------------------------ what the engine calls

    def record_step(self, *, step: int, samples: float, step_s: float, wait_s: float, lr: float,
                    losses: Mapping[str, float], grad_norm: float | None = None, skipped: bool = False,
                    diagnostics: Mapping[str, float] | None = None,
                    bad_samples: Mapping[str, int] | None = None) -> None:
        """One finished optimizer step of this rank. samples: this rank's samples in the
        step; losses: {objective or "total": value}; diagnostics: the objectives'
        "name/what" values, of which "name/temperature" is exported; bad_samples: {reason:
        samples skipped in the step} (reasons outside BAD_REASONS count as "other")."""
        lv = self._lv
        self._steps.labels(*lv).inc()
        if skipped:
            self._skipped.labels(*lv).inc()
        for reason, n in (bad_samples or {}).items():
            self._bad.labels(*lv, reason if reason in BAD_REASONS else "other").inc(n)
        self._samples.labels(*lv).inc(samples)
        self._step.labels(*lv).set(step)
        self._lr.labels(*lv).set(lr)
        self._step_s.labels(*lv).observe(step_s)
        self._wait_s.labels(*lv).observe(wait_s)
        if step_s > 0:
            self._throughput.labels(*lv).set(samples / step_s)
            if self._mfu is not None:
                self._mfu.set(samples / step_s * self._train_flops_per_sample / self._peak_flops)
        if grad_norm is not None:
            self._grad_norm.labels(*lv).set(float(grad_norm))
        for name, value in losses.items():
            self._loss.labels(*lv, name).set(float(value))
        for key, value in (diagnostics or {}).items():
            objective, _, what = key.partition("/")
            if what == "temperature":
                self._temperature.labels(*lv, objective).set(float(value))
        self._last_step.labels(*lv).set(time.time())

    def record_checkpoint(self, seconds: float, *, ok: bool = True) -> None:
        if ok:
            self._ckpt_s.labels(*self._lv).observe(seconds)
            self._ckpt_ok.labels(*self._lv).set(time.time())
        else:
            self._ckpt_failed.labels(*self._lv).inc()

    def record_eval(self, results: Mapping, *, step: int | None = None) -> None:
        """Evaluation results as `vlm_eval_metric{task, metric}` (see eval_figures)."""
        for task, metric, value in eval_figures(results):
            self._eval.labels(*self._lv, task, metric).set(value)
        step = step if step is not None else results.get("step")
        if _is_number(step):
            self._eval_step.labels(*self._lv).set(step)
        self._eval_time.labels(*self._lv).set(time.time())

    def write_endpoint(self, run_dir: str, rank: int) -> str:
        """Records where this rank serves: `{run_dir}/metrics/rank{rank}.json` for tools and
        tests, and a file_sd target `{run_dir}/metrics/targets/rank{rank}.json` (also in
        $VLM_METRICS_SD_DIR when set) labelled run and rank, removed again by close(), so
        a target left behind is a worker that died. A remote run_dir (a URL: vlm.rundir)
        gets rank{rank}.json; the targets, which Prometheus reads as local files, go to the
        run's local scratch directory (and $VLM_METRICS_SD_DIR), and a copy to
        `{run_dir}/metrics/targets/rank{rank}.json` at the URL, which `vlm monitor URL`
        mirrors onto its machine. Returns rank{rank}.json's path or URL."""
        from vlm import rundir

        path = rundir.join(run_dir, "metrics", f"rank{rank}.json")
        rundir.write_text(path, json.dumps({"rank": rank, "url": self.url, "pid": os.getpid()}))
        labels = {"run": self.run, "rank": str(rank)}
        address = target_address(self.host, self.port)
        targets = [(os.path.join(rundir.scratch_dir(run_dir), "metrics", TARGETS_DIR), f"rank{rank}.json")]
        if os.environ.get(SD_DIR_ENV):
            targets.append((os.environ[SD_DIR_ENV], f"train-{self.run}-rank{rank}.json"))
        self._sd_paths = [write_sd_target(os.path.join(dd, name), address, labels) for dd, name in targets]
        if rundir.is_remote(run_dir):
            self._remote_sd = rundir.join(run_dir, "metrics", TARGETS_DIR, f"rank{rank}.json")
            rundir.write_text(self._remote_sd, json.dumps([{"targets": [address], "labels": labels}]))
        return path

    def close(self) -> None:
        """Withdraws the targets, the remote one too (best effort: a target left behind
        reads as a worker that died), and stops serving."""
        remote, self._remote_sd = self._remote_sd, None
        if remote:
            from vlm import rundir

            try:
                rundir.remove(remote)
            except Exception as e:  # noqa: BLE001 - botocore's errors are no OSError
                print(f"warning: could not remove the metrics target {remote} ({e})", flush=True)
        super().close()
