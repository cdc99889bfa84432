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

import fsspec
import numpy as np
import torch
import torch.distributed as dist

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"


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


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def has_checkpoint(root: str) -> bool:
    """Whether a checkpoint directory (local or remote) holds at least one complete
    checkpoint: what `--resume auto` asks before deciding between resuming and starting."""
    if is_remote(root):
        import fsspec

        fs, base = fsspec.core.url_to_fs(root)
        return fs.exists(base) and bool(_remote_tags(fs, base.rstrip("/")))
    return Path(root).is_dir() and bool(complete_tags(Path(root)))


def _owned(name: str, rank: int) -> bool:
    """Which rank wrote a DeepSpeed file: zero_pp_rank_{r}_* is rank r's, the rest rank 0's."""
    if name.startswith("zero_pp_rank_"):
        return name.startswith(f"zero_pp_rank_{rank}_")
    return rank == 0


def _file_meta(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


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
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    # what DeepSpeed's universal conversion (a resume at another world size) requires; pure
    # data parallelism: no tensor-parallel patterns to declare
    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(local_root), tag=tag, save_latest=False, client_state=info)
    per_rank = _gather(rank_state)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        _atomic_write(local / TRAINER_STATE, _to_bytes({**shared_state, "ranks": per_rank}))
    _barrier()
    mine = sorted(p for p in local.rglob("*") if p.is_file() and _owned(str(p.relative_to(local)), rank)
                  and p.name != MANIFEST and not p.name.endswith(".tmp"))
    meta = {str(p.relative_to(local)): _file_meta(p) for p in mine}
    if remote:
        fs, base = fsspec.core.url_to_fs(root)
        for p in mine:
            fs.put_file(str(p), f"{base}/{tag}/{p.relative_to(local)}")
    files: dict = {}
    for part in _gather(meta):
        files.update(part)
    if rank == 0:
        manifest = json.dumps({"tag": tag, "step": step, "files": dict(sorted(files.items()))}, indent=1).encode()
        if remote:
            fs.pipe_file(f"{base}/{tag}/{MANIFEST}", manifest)
            fs.pipe_file(f"{base}/latest", tag.encode())  # one PUT: atomic on S3
        else:
            _atomic_write(local / MANIFEST, manifest)
            _atomic_write(local_root / "latest", tag.encode())
    _barrier()
    if remote:
        for p in mine:
            p.unlink()
        return f"{root.rstrip('/')}/{tag}"
    return str(local)


def write_manifest(ckpt: Path, step: int) -> None:
    """Sizes and sha256 of every file in `ckpt`, written last: its presence marks the
    checkpoint complete."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"tag": ckpt.name, "step": step, "files": {
        str(p.relative_to(ckpt)): _file_meta(p) for p in files}}
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


def _remote_tags(fs, base: str) -> list[tuple[int, str]]:
    """(step, tag) of every remote tag with a manifest, newest first."""
    out = []
    for d in fs.ls(base, detail=False):
        name = d.rstrip("/").rsplit("/", 1)[-1]
        if fs.exists(f"{base}/{name}/{MANIFEST}"):
            out.append((json.loads(fs.cat_file(f"{base}/{name}/{MANIFEST}"))["step"], name))
    return sorted(out, reverse=True)


def fetch_remote(root: str, tag: str, cache: str | os.PathLike, *, warn=print) -> Path:
    """A remote checkpoint directory (root = s3://.../checkpoints) -> a verified local copy
    under `cache`. With tag 'latest', a corrupt or incomplete newest checkpoint is
    reported through `warn` and the previous complete one is tried."""
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(base):
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    if tag != "latest":
        names = [tag]
    else:
        named = fs.cat_file(f"{base}/latest").decode().strip() if fs.exists(f"{base}/latest") else None
        names = ([named] if named else []) + [t for _, t in _remote_tags(fs, base) if t != named]
    for name in names:
        local = Path(cache) / name
        try:
            if not fs.exists(f"{base}/{name}/{MANIFEST}"):
                raise ValueError(f"checkpoint {root}/{name} is incomplete: no {MANIFEST}")
            manifest = json.loads(fs.cat_file(f"{base}/{name}/{MANIFEST}"))
            local.mkdir(parents=True, exist_ok=True)
            for rel, meta in manifest["files"].items():
                dst = local / rel
                if dst.is_file() and dst.stat().st_size == meta["bytes"] and _sha256(dst) == meta["sha256"]:
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                if fs.exists(f"{base}/{name}/{rel}"):
                    fs.get_file(f"{base}/{name}/{rel}", str(dst))
                else:
                    dst.unlink(missing_ok=True)
            _atomic_write(local / MANIFEST, json.dumps(manifest, indent=1).encode())
            verify(local)
            return local
        except ValueError as e:
            if tag != "latest":
                raise
            warn(f"warning: {str(e).replace(str(local), f'{root}/{name}')}; trying the previous checkpoint")
    raise FileNotFoundError(f"no complete checkpoint to resume under {root}")


def prune_remote(root: str, keep: int) -> list[str]:
    """prune() for a remote checkpoint directory."""
    if keep <= 0:
        return []
    fs, base = fsspec.core.url_to_fs(root)
    doomed = [t for _, t in _remote_tags(fs, base)][keep:]
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


def verify(ckpt: Path) -> None:
    """Raises if a file listed in the manifest is missing or differs."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        p = ckpt / name
        if not p.is_file() or p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            raise ValueError(f"checkpoint {ckpt} is corrupt: {name} does not match its manifest")


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)


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
