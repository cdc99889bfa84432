"""Writing checkpoints: DeepSpeed's sharded files + one trainer-state file + a manifest written last; pruning old ones.

The layout is vlm/checkpoint/layout.py's; a tag is complete once its manifest is written
(vlm/checkpoint/verify.py), and `latest` is replaced after it, atomically."""
from __future__ import annotations

import io
import os
from pathlib import Path

import fsspec
import torch
import torch.distributed as dist

from vlm.checkpoint.discover import complete_tags, remote_tags
from vlm.checkpoint.layout import LATEST, MANIFEST, TRAINER_STATE, durable_write, is_remote, tag_for_step
from vlm.checkpoint.rng import rng_state
from vlm.checkpoint.verify import file_meta, manifest_bytes
from vlm.distributed import gather_objects


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _owned(name: str, rank: int) -> bool:
    """Which rank wrote a DeepSpeed file: zero_pp_rank_{r}_* is rank r's, the rest rank 0's."""
    if name.startswith("zero_pp_rank_"):
        return name.startswith(f"zero_pp_rank_{rank}_")
    return rank == 0


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def shared_state(*, step: int, samples_seen: int, config: dict, tokenizer: str, world_size: int,
                 zero_stage: int) -> dict:
    """The part of trainer_state.pt every rank shares, as save() takes it: what a resume, an
    export and `vlm ckpt inspect` read (README, "Contracts")."""
    return {"step": step, "samples_seen": samples_seen, "config": config, "tokenizer": tokenizer,
            "world_size": world_size, "zero_stage": zero_stage}


def rank_state(reader_state: dict) -> dict:
    """This rank's part of the trainer state, as save() takes it: its reader's position and
    every generator's state (vlm.checkpoint.rng)."""
    return {"reader": reader_state, "rng": rng_state()}


def _save_engine(engine, local_root: Path, tag: str) -> None:
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    # what DeepSpeed's universal conversion (a resume at another world size) requires; pure
    # data parallelism: no tensor-parallel patterns to declare
    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(local_root), tag=tag, save_latest=False, client_state=info)


def save(engine, root: str, *, step: int, shared_state: dict, rank_state: dict,
         staging: str | os.PathLike | None = None) -> str:
    """Collective: every rank calls it. `root` is the checkpoint directory (local, or an
    fsspec URL such as s3://bucket/run/checkpoints, in which case DeepSpeed writes into
    `staging` first and each rank uploads the files it wrote). `shared_state` is rank 0's
    (step, config, ...); `rank_state` is this rank's (reader, RNG). Every rank hashes its
    own files; rank 0 writes the manifest after every file is in place, then `latest`.
    Returns the checkpoint's path or URL."""
    remote = is_remote(root)
    if remote and staging is None:
        raise ValueError(f"saving to {root} needs a local staging directory")
    local_root = Path(staging if remote else root)
    tag = tag_for_step(step)
    local = local_root / tag
    _save_engine(engine, local_root, tag)
    per_rank = gather_objects(rank_state)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        durable_write(local / TRAINER_STATE, _to_bytes({**shared_state, "ranks": per_rank}))
    _barrier()
    mine = sorted(p for p in local.rglob("*") if p.is_file() and _owned(str(p.relative_to(local)), rank)
                  and p.name != MANIFEST and not p.name.endswith(".tmp"))
    meta = {str(p.relative_to(local)): file_meta(p) for p in mine}
    if remote:
        fs, base = fsspec.core.url_to_fs(root)
        for p in mine:
            fs.put_file(str(p), f"{base}/{tag}/{p.relative_to(local)}")
    files: dict = {}
    for part in gather_objects(meta):
        files.update(part)
    if rank == 0:
        manifest = manifest_bytes(tag, step, files)
        if remote:
            fs.pipe_file(f"{base}/{tag}/{MANIFEST}", manifest)
            fs.pipe_file(f"{base}/{LATEST}", tag.encode())  # one PUT: atomic on S3
        else:
            durable_write(local / MANIFEST, manifest)
            durable_write(local_root / LATEST, tag.encode())
    _barrier()
    if remote:
        for p in mine:
            p.unlink()
        return f"{root.rstrip('/')}/{tag}"
    return str(local)


def prune_remote(root: str, keep: int) -> list[str]:
    """prune() for a remote checkpoint directory."""
    if keep <= 0:
        return []
    fs, base = fsspec.core.url_to_fs(root)
    doomed = [t for _, t in remote_tags(fs, base)][keep:]
    for name in doomed:
        fs.rm_file(f"{base}/{name}/{MANIFEST}")
        fs.rm(f"{base}/{name}", recursive=True)
    return [f"{root.rstrip('/')}/{t}" for t in doomed]


def prune(root: Path, keep: int) -> list[Path]:
    """Deletes all but the `keep` newest complete checkpoints (0 keeps all); returns them.
    Incomplete dirs are left alone: one may be a save in progress."""
    import shutil

    if keep <= 0:
        return []
    doomed = complete_tags(root)[keep:]
    for d in doomed:
        (d / MANIFEST).unlink()  # first, so a half-deleted dir never looks complete
        shutil.rmtree(d)
    return doomed
