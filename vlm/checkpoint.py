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
        files = sorted(p for p in (root / tag).rglob("*") if p.is_file() and p.name != MANIFEST)
        manifest = {"tag": tag, "step": step, "files": {
            str(p.relative_to(root / tag)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
        _atomic_write(root / tag / MANIFEST, json.dumps(manifest, indent=1).encode())
        _atomic_write(root / "latest", tag.encode())
    _barrier()
    return root / tag


def _to_bytes(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def resolve(path: str, tag: str = "latest") -> Path:
    """A run dir (+ tag, 'latest' by default) or a checkpoint dir -> a complete checkpoint dir."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if tag == "latest":
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"no checkpoint to resume: {latest} does not exist")
        tag = latest.read_text().strip()
    ckpt = root / tag
    if not (ckpt / MANIFEST).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} is incomplete or missing (no {MANIFEST})")
    return ckpt


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
    """Collective: restores DeepSpeed's state and returns the trainer state."""
    verify(ckpt)
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
