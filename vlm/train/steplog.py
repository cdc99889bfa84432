"""The step log: train_log.jsonl's rows and console lines, its bad-sample totals, its truncation on resume.

Each row names the world size and this process's start time, so that `vlm report` can mark
where a run was resized or restarted even though a restart's log is truncated to its checkpoint."""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from vlm import rundir
from vlm.observe.metrics import BAD_REASONS

TRAIN_LOG = "train_log.jsonl"
WORKER_START = time.time()  # a row's "worker_start": a new value is a new (restarted) process


def floats(values: dict) -> dict[str, float]:
    """A step's losses or diagnostics (tensors on the device) as Python floats: this waits for the device."""
    return {k: float(v) for k, v in values.items()}


def bad_sample_totals(bad_counts: Mapping[str, int], world_size: int) -> dict[str, int]:
    """Collective. Bad samples skipped so far by every rank (each rank's `bad_counts`), for
    the step log: "bad_samples" and "bad_samples/REASON" (vlm.observe.metrics.BAD_REASONS)."""
    counts = torch.tensor([float(bad_counts.get(r, 0)) for r in BAD_REASONS])
    if world_size > 1:
        dist.all_reduce(counts)
    totals = {f"bad_samples/{r}": int(n) for r, n in zip(BAD_REASONS, counts.tolist())}
    return {"bad_samples": sum(totals.values()), **totals}


def write_step(log, r: dict, *, step: int, steps: int, samples_seen: int, global_batch: int,
               bad: dict[str, int]) -> None:
    """One row of the step log for a step's record `r` (Trainer.train_step), and its console
    line. "world_size" is the process group's (1 without one); logs written before it have
    neither it nor "worker_start"."""
    rate = global_batch / r["step_s"]
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rec = {"step": step, "samples": samples_seen, "lr": r["lr"], "step_s": r["step_s"],
           "data_wait_s": r["wait_s"], "samples_per_s": rate, "grad_norm": r["grad_norm"],
           **r["diagnostics"], **{f"loss/{k}": v for k, v in r["losses"].items()}, **bad,
           "world_size": world_size, "worker_start": WORKER_START}
    log.write(json.dumps(rec) + "\n")
    log.flush()
    print(f"step {step}/{steps} loss {r['losses']['total']:.4f} lr {r['lr']:.2e} "
          f"{rate:.0f} samples/s", flush=True)


def truncate_log(path: str | Path, step: int) -> None:
    """Drops the rows of a JSON-lines log (a path or a URL: vlm.rundir) past `step` (and a
    line cut short by a kill), atomically: the log keeps exactly one row per step however
    often a run resumes."""
    if not rundir.exists(path):
        return
    kept = []
    for line in rundir.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    rundir.write_text(path, "".join(kept))
