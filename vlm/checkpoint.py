"""Checkpoints: DeepSpeed's sharded files + one trainer-state file + a manifest written last.

Layout (DESIGN.md): {run_dir}/checkpoints/{tag}/ holds DeepSpeed's files, trainer_state.pt
(step, samples seen, every rank's reader and RNG state, resolved config, tokenizer) and
manifest.json (sizes and sha256 of every file). A tag without a manifest is incomplete
and never loaded. {run_dir}/checkpoints/latest names the newest complete tag and is
replaced atomically."""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"


def checkpoint_root(run_dir: str) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj):
    if dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save(engine, run_dir: str, *, step: int, shared_state: dict, rank_state: dict) -> Path:
    """Collective: every rank calls it. `shared_state` is rank 0's (step, config, ...);
    `rank_state` is this rank's (reader, RNG)."""
    root = checkpoint_root(run_dir)
    tag = tag_for_step(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    per_rank = _gather(rank_state)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        buf = _to_bytes({**shared_state, "ranks": per_rank})
        _atomic_write(root / tag / TRAINER_STATE, buf)
    _barrier()
    if rank == 0:
        write_manifest(root / tag, step)
        _atomic_write(root / "latest", tag.encode())
    _barrier()
    return root / tag


def write_manifest(ckpt: Path, step: int) -> None:
    """Sizes and sha256 of every file in `ckpt`, written last: its presence marks the
    checkpoint complete."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"tag": ckpt.name, "step": step, "files": {
        str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
    _atomic_write(ckpt / MANIFEST, json.dumps(manifest, indent=1).encode())


def _to_bytes(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def complete_tags(root: Path) -> list[Path]:
    """Checkpoint dirs under `root` that have a manifest, newest step first."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and (d / MANIFEST).is_file()]
    return sorted(dirs, key=lambda d: json.loads((d / MANIFEST).read_text())["step"], reverse=True)


def resolve(path: str, tag: str = "latest", *, verify_files: bool = False, warn=print) -> Path:
    """A run dir (+ tag, 'latest' by default) or a checkpoint dir -> a complete checkpoint dir.

    With verify_files, every file is checked against the manifest; when the newest
    checkpoint is truncated or corrupt, 'latest' falls back to the newest one that is
    whole, and `warn` is told which file was bad."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        if verify_files:
            verify(p)
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if tag != "latest":
        ckpt = root / tag
        if not (ckpt / MANIFEST).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} is incomplete or missing (no {MANIFEST})")
        if verify_files:
            verify(ckpt)
        return ckpt
    latest = root / "latest"
    named = root / latest.read_text().strip() if latest.is_file() else None
    candidates = ([named] if named is not None else []) + [d for d in complete_tags(root) if d != named]
    for ckpt in candidates:
        try:
            if not (ckpt / MANIFEST).is_file():
                raise ValueError(f"checkpoint {ckpt} is incomplete: no {MANIFEST}")
            if verify_files:
                verify(ckpt)
            return ckpt
        except ValueError as e:
            warn(f"warning: {e}; trying the previous checkpoint")
    raise FileNotFoundError(f"no complete checkpoint to resume under {root}")


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


def verify(ckpt: Path) -> None:
    """Raises if a file listed in the manifest is missing or differs."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        p = ckpt / name
        if not p.is_file() or p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            raise ValueError(f"checkpoint {ckpt} is corrupt: {name} does not match its manifest")


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)


def load(engine, ckpt: Path) -> dict:
    """Collective: restores DeepSpeed's state and returns the trainer state (verify the
    files first: resolve(..., verify_files=True))."""
    load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt}")
    return load_trainer_state(ckpt)


def load_module_weights(ckpt: Path) -> dict:
    """Full module weights for evaluation, without DeepSpeed (ZeRO 0-2 keep them whole)."""
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no model states in {ckpt}")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    module = state.get("module")
    if not module:
        raise ValueError(f"{files[0]} holds no module weights (ZeRO-3 checkpoints need consolidation)")
    return module
