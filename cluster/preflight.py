"""Checks of a training run that need no Ray, run before Ray starts: by `vlm train`, by
`vlm cluster run` (the job's entrypoint, on the cluster) and, those that need no file
system of the cluster, by `vlm cluster submit`. A mistake is then a ConfigError (exit
status 2) naming the key, file or directory, in a second, instead of a traceback out of a
worker group minutes later. The engine checks a resumed config again itself
(vlm.config_changes.check_resume_config), for `python -m vlm.train.trainer` and remote checkpoints."""
from __future__ import annotations

import math
import os
import sys
import tempfile
import uuid
from pathlib import Path

from vlm import rundir
from vlm.config import ConfigError, RunConfig
from vlm.config_changes import check_resume_config


def check_batch(cfg: RunConfig) -> None:
    """train.global_batch_size must split evenly into micro-batches on every worker, at
    every size an elastic train.num_workers range allows (the run may restart at any)."""
    t = cfg.train
    if t.global_batch_size is None:
        return
    low, high = t.worker_range()
    sizes = range(low, high + 1)
    fits = [n for n in sizes if t.global_batch_size % (t.micro_batch_size * n) == 0]
    if len(fits) == len(sizes):
        return
    if low == high:
        per_pass = t.micro_batch_size * low
        near = max(per_pass, round(t.global_batch_size / per_pass) * per_pass)
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size × train.num_workers = {t.micro_batch_size} × {low} "
                          f"= {per_pass} (e.g. {near})")
    every = t.micro_batch_size * math.lcm(*sizes)
    near = max(every, round(t.global_batch_size / every) * every)
    works = ", ".join(map(str, fits)) if fits else "none"
    raise ConfigError(f"train.global_batch_size {t.global_batch_size} does not split into micro-batches of "
                      f"{t.micro_batch_size} at every size of train.num_workers [{low}, {high}]: sizes that "
                      f"split it: {works}; narrow the range to those, or use a global batch that every size "
                      f"splits (a multiple of {t.micro_batch_size} × lcm({low}..{high}) = {every}, e.g. {near})")


def check_resume(cfg: RunConfig, resume: str | None) -> Path | None:
    """--resume against a local checkpoint directory: a fresh run must not start over
    existing checkpoints; a resume needs a checkpoint (the newest complete one, or the
    tag), whose saved config may differ from cfg only in RESUME_CHANGEABLE keys (a remote
    checkpoint directory: only the first). Returns the checkpoint found (None: a fresh run,
    or one on a remote store, left to the workers, which check it as they load it)."""
    from vlm.checkpoint.discover import has_checkpoint
    from vlm.checkpoint.layout import LATEST
    from vlm.checkpoint.resolve import locate
    from vlm.checkpoint.safeload import load_trainer_state

    root = cfg.path(cfg.train.checkpoint_dir)
    if not resume:
        latest_file = rundir.join(root, LATEST)
        latest = rundir.read_text(latest_file).strip() if rundir.exists(latest_file) else None
        if latest is not None:
            raise ConfigError(f"{cfg.run_dir} already has checkpoints in {root} (newest: "
                              f"{latest}): pass --resume latest to continue it, or "
                              "--set run_dir=NEW_DIR to start over")
        return None
    if resume == "auto":
        if not has_checkpoint(root):
            return None
        resume = "latest"
    try:
        ckpt = locate(resume, root, cache=None, warn=lambda m: print(m, file=sys.stderr))
    except FileNotFoundError as e:
        raise ConfigError(f"--resume {resume}: nothing to resume in train.checkpoint_dir {root}: {e}") from None
    if ckpt is not None:
        check_resume_config(load_trainer_state(ckpt).get("config"), cfg, checkpoint=ckpt)
    return ckpt


def check_run_dir(cfg: RunConfig) -> None:
    """The run directory must take files (tokenizer, logs, metrics targets, checkpoints):
    created if missing, then a probe file written and removed. A URL (s3://bucket/run):
    a probe object written and deleted."""
    if rundir.is_remote(cfg.run_dir):
        _check_remote_run_dir(cfg.run_dir)
        return
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} is not writable ({e.strerror or e}): set run_dir to a "
                          "directory this user can write") from None


def _check_remote_run_dir(url: str) -> None:
    probe = rundir.join(url, f".write-probe-{uuid.uuid4().hex}")
    try:
        rundir.write_text(probe, "")
        rundir.remove(probe)
    except Exception as e:  # noqa: BLE001 - a missing bucket, refused credentials, no s3fs, no endpoint
        raise ConfigError(f"run_dir {url} is not writable ({type(e).__name__}: {e}): create the bucket, "
                          "check the credentials and endpoint (AWS_* variables, e.g. AWS_ENDPOINT_URL), "
                          "or set run_dir to a writable location") from None


def check_train(cfg: RunConfig, resume: str | None, *, local: bool = True) -> Path | None:
    """Every check of a training run that can run before Ray starts; ConfigError on the
    first that fails. local=False (a submitter, which may not see the cluster's file
    system): only those that read no files. Returns the checkpoint a resume will load,
    when it was found here."""
    check_batch(cfg)
    if not local:
        return None
    remote = rundir.is_remote(cfg.run_dir)
    if remote:  # first: a missing bucket is named before anything is read from it
        check_run_dir(cfg)
    ckpt = check_resume(cfg, resume)
    if not remote:
        check_run_dir(cfg)
    return ckpt
