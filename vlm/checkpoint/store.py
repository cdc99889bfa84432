"""Checkpoints: DeepSpeed's sharded files + one trainer-state file + a manifest written last.

Layout (DESIGN.md): {run_dir}/checkpoints/{tag}/ holds DeepSpeed's files, trainer_state.pt
(step, samples seen, every rank's reader and RNG state, resolved config, tokenizer) and
manifest.json (sizes and sha256 of every file). A tag without a manifest is incomplete
and never loaded. {run_dir}/checkpoints/latest names the newest complete tag and is
replaced atomically.

Trust (DESIGN.md, "Trust boundaries"): whoever can write a checkpoint directory (a shared
volume, a bucket) can also rewrite its manifest, so the manifest proves completeness, not
origin. Hence every checkpoint file is unpickled as tensors and plain data only
(`load`: weights_only, allowing three DeepSpeed types), DeepSpeed's own loads included
(`check_files` + `weights_only_loads`), and a file or tag name read from a manifest, a
`latest` file or a store listing never leaves its directory. Either kind of tampering
raises UnsafeCheckpointError, which is never a reason to fall back to an older
checkpoint: it is refused outright."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import sys
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.distributed as dist

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that needs a global outside the allow-list, or a name (a manifest
    entry, `latest`, a tag) that would leave its directory: tampered with or foreign.
    For a file: `path` and what it `needs`."""

    def __init__(self, message: str, *, path: Path | None = None, needs: str | None = None):
        super().__init__(message)
        self.path, self.needs = path, needs


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
    """Plain data only (NumPy's key as a list of ints), so the trainer state loads without
    NumPy's globals."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, key.tolist(), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]  # a list, or an array in checkpoints written before
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
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


def checked_name(name: str, *, what: str, where, tag: bool = False) -> str:
    """A name read from a manifest, a `latest` file, a store listing or the command line,
    as is; UnsafeCheckpointError naming it when it is absolute, contains '..' or (a tag:
    one directory name) has a separator."""
    if (not name or name == "." or ".." in name or "\0" in name or "://" in name or name.startswith(("/", "\\"))
            or re.match(r"[A-Za-z]:", name) or (tag and ("/" in name or "\\" in name))):
        raise UnsafeCheckpointError(f"refusing {what} {name!r} from {where}: it must stay inside its directory "
                                    f"({'one directory name' if tag else 'a relative path'}, no '..')")
    return name


def inside(base: Path, name: str, *, what: str = "file name", where=None, tag: bool = False) -> Path:
    """base / checked_name(name), also refused when it resolves outside base (a symbolic
    link on the way)."""
    path = Path(base) / checked_name(name, what=what, where=where or base, tag=tag)
    if not path.resolve().is_relative_to(Path(base).resolve()):
        raise UnsafeCheckpointError(f"refusing {what} {name!r} from {where or base}: it resolves outside {base} "
                                    f"(to {path.resolve()})")
    return path


def complete_tags(root: Path) -> list[Path]:
    """Checkpoint dirs under `root` that have a manifest, newest step first."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and (d / MANIFEST).is_file()]
    return sorted(dirs, key=lambda d: json.loads((d / MANIFEST).read_text())["step"], reverse=True)


def resolve(path: str, tag: str = "latest", *, verify_files: bool = False, warn=print) -> Path:
    """A run dir (+ tag, 'latest' by default) or a checkpoint dir -> a complete checkpoint dir
    whose every file loads as tensors and plain data (check_files).

    With verify_files, every file is checked against the manifest; when the newest
    checkpoint is truncated or corrupt, 'latest' falls back to the newest one that is
    whole, and `warn` is told which file was bad. A tampered one (UnsafeCheckpointError:
    a refused global, a name leaving its directory) is refused, never skipped."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        if verify_files:
            verify(p)
        check_files(p)
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if tag != "latest":
        ckpt = inside(root, tag, what="checkpoint tag", tag=True)
        if not (ckpt / MANIFEST).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} is incomplete or missing (no {MANIFEST})")
        if verify_files:
            verify(ckpt)
        check_files(ckpt)
        return ckpt
    latest = root / "latest"
    named = latest.read_text().strip() if latest.is_file() else ""
    named = inside(root, named, what="checkpoint tag", where=latest, tag=True) if named else None
    candidates = ([named] if named is not None else []) + [d for d in complete_tags(root) if d != named]
    for ckpt in candidates:
        try:
            if not (ckpt / MANIFEST).is_file():
                raise ValueError(f"checkpoint {ckpt} is incomplete: no {MANIFEST}")
            if verify_files:
                verify(ckpt)
            check_files(ckpt)
            return ckpt
        except UnsafeCheckpointError:
            raise
        except ValueError as e:
            warn(f"warning: {e}; trying the previous checkpoint")
    raise FileNotFoundError(f"no complete checkpoint under {root}")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def resolve_verified(path: str, tag: str = "latest", *, warn=_to_stderr) -> Path:
    """The one rule for every command that reads a checkpoint (vlm eval, caption,
    eval-generative, ckpt export, data score; `vlm train --resume` reaches the same through
    locate): `resolve` with every file checked against the manifest, so a torn file is
    reported by name instead of failing deep inside torch. A run dir ('latest') falls back
    past a corrupt or incomplete newest checkpoint to the previous whole one, and `warn`
    (stderr) is told which file was bad and which checkpoint is used instead. A checkpoint
    named explicitly (its directory, or `tag`) is that one or an error naming the bad file:
    never silently replaced by another. Hashes every file once: callers pass the result on
    rather than resolving again."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint or run directory not found: {path}")
    if not (p / MANIFEST).is_file() and ((p / TRAINER_STATE).is_file() or any(p.glob("*model_states.pt"))):
        raise ValueError(f"checkpoint {p} is incomplete: no {MANIFEST} (its save did not finish)")
    warned: list[str] = []

    def note(message: str) -> None:
        warned.append(message)
        warn(message)

    ckpt = resolve(path, tag, verify_files=True, warn=note)
    if warned:
        warn(f"warning: using the previous complete checkpoint {ckpt}")
    return ckpt


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
    reported through `warn` and the previous complete one is tried. Every tag and file
    name (from `latest`, the listing, the manifest) must stay inside its directory, here
    and in the cache, and every file must load safely (check_files): else
    UnsafeCheckpointError, before anything is written outside the cache."""
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(base):
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    named = None
    if tag != "latest":
        names = [tag]
    else:
        named = fs.cat_file(f"{base}/latest").decode().strip() if fs.exists(f"{base}/latest") else None
        names = ([named] if named else []) + [t for _, t in _remote_tags(fs, base) if t != named]
    for name in names:
        checked_name(name, what="checkpoint tag", where=f"{root}/latest" if name == named else root, tag=True)
        local = inside(Path(cache), name, what="checkpoint tag", tag=True)
        try:
            if not fs.exists(f"{base}/{name}/{MANIFEST}"):
                raise ValueError(f"checkpoint {root}/{name} is incomplete: no {MANIFEST}")
            manifest = json.loads(fs.cat_file(f"{base}/{name}/{MANIFEST}"))
            for rel in manifest["files"]:  # all of them, before anything is written
                checked_name(rel, what="file name", where=f"{root}/{name}/{MANIFEST}")
            local.mkdir(parents=True, exist_ok=True)
            for rel, meta in manifest["files"].items():
                dst = inside(local, rel, where=f"{root}/{name}/{MANIFEST}")
                if dst.is_file() and dst.stat().st_size == meta["bytes"] and _sha256(dst) == meta["sha256"]:
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                if fs.exists(f"{base}/{name}/{rel}"):
                    fs.get_file(f"{base}/{name}/{rel}", str(dst))
                else:
                    dst.unlink(missing_ok=True)
            _atomic_write(local / MANIFEST, json.dumps(manifest, indent=1).encode())
            verify(local)
            check_files(local)
            return local
        except UnsafeCheckpointError as e:  # named where it was tampered with
            raise UnsafeCheckpointError(str(e).replace(str(local), f"{root}/{name}")) from None
        except ValueError as e:
            if tag != "latest":
                raise
            warn(f"warning: {str(e).replace(str(local), f'{root}/{name}')}; trying the previous checkpoint")
    raise FileNotFoundError(f"no complete checkpoint to resume under {root}")


def locate(resume: str, root: str, *, cache: str | os.PathLike | None, warn=print) -> Path | None:
    """--resume latest|TAG|PATH|URL against the run's checkpoint directory `root` -> a
    verified local checkpoint dir whose files load safely (remote ones are downloaded into
    `cache`). With cache None (a driver checking before it starts any worker), a remote
    checkpoint is left to the workers: None."""
    if is_remote(resume) or (is_remote(root) and not Path(resume).exists()):
        if cache is None:
            return None
        url, tag = resume.rstrip("/").rsplit("/", 1) if is_remote(resume) else (root, resume)
        return fetch_remote(url, tag, cache, warn=warn)
    if Path(resume).exists():
        return resolve(resume, verify_files=True, warn=warn)
    return resolve(root, resume, verify_files=True, warn=warn)


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
        p = inside(ckpt, name, where=ckpt / MANIFEST)
        if not p.is_file() or p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            raise ValueError(f"checkpoint {ckpt} is corrupt: {name} does not match its manifest")


# -- loading without running code from the file ---------------------------------------------
#
# Beyond tensors and plain containers (which weights_only loads by default), the files of a
# checkpoint hold only these, found by saving real checkpoints at ZeRO 0-3 (fp32), with the
# optimizer offloaded, and converting them to the universal format (DeepSpeed 0.19): the
# ZeRO stage (an int enum), the static loss scaler of the ZeRO optimizers (attributes only)
# and the fragment addresses of their parameter slice mappings (a dataclass; the bf16
# optimizer of GPU runs saves the same, by its state_dict). Building any of them runs no
# code beyond setting attributes.
_DEEPSPEED_GLOBALS = (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address"))
_registered = False


def _legacy_rng_globals() -> list:
    """What NumPy's RNG state (an array) needs in trainer states written before rng_state()
    kept it as a list: an array of plain numbers, built by NumPy's own constructor."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray
    return [(multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
            (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def _register_safe_globals() -> None:
    """Adds DeepSpeed's few types to torch's allow-list, process-wide: DeepSpeed's own
    loads (forced to weights_only by weights_only_loads) consult it too."""
    global _registered
    if _registered:
        return
    import importlib

    if "deepspeed" not in sys.modules:  # its import inspects the accelerator
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    torch.serialization.add_safe_globals([getattr(importlib.import_module(m), n) for m, n in _DEEPSPEED_GLOBALS])
    _registered = True


def _refused(path: Path, error: Exception) -> list[str]:
    """The globals a refused file needs that are not allowed: torch lists them without
    unpickling (its error message names the first). None for a file that is merely not
    a pickle torch reads (garbage): unreadable, not unsafe."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        found = []
    return found or re.findall(r"GLOBAL (\S+)", str(error))[:1]


def load(path: str | os.PathLike, *, mmap: bool = False):
    """torch.load restricted to tensors, plain data and the allow-list above: a file that
    needs anything else raises UnsafeCheckpointError naming the file and the global, and
    nothing of it runs. An unreadable file raises ValueError."""
    path = Path(path)
    _register_safe_globals()
    extra = _legacy_rng_globals() if path.name == TRAINER_STATE else []
    mmap = mmap and zipfile.is_zipfile(path)  # torch's legacy format cannot be mapped: read it whole
    with torch.serialization.safe_globals(extra):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            refused = _refused(path, e)
            if not refused:
                raise ValueError(f"checkpoint file {path} is unreadable: not a pickle that torch reads") from None
            needs = f"the global{'s' if len(refused) > 1 else ''} {', '.join(refused)}"
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint file {path}: it needs {needs}, which is not on the allow-list "
                f"of tensors and plain data (a tampered or foreign file; nothing of it was run)",
                path=path, needs=needs) from None
        except FileNotFoundError:
            raise
        except Exception as e:  # torn or garbage: torch's unpickler fails in many ways
            raise ValueError(f"checkpoint file {path} is unreadable: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]}") from None


def check_files(ckpt: Path) -> None:
    """Loads every .pt file under `ckpt` (subdirectories too: a universal checkpoint's
    zero/) the way `load` does, without reading the tensors (mmap): what DeepSpeed opens
    next is then known to hold nothing but allowed data. Raises UnsafeCheckpointError on
    the first that does not. An unreadable one (torn, garbage) is the manifest's business
    (verify), as before; whatever reads it later loads it weights_only too."""
    for p in sorted(Path(ckpt).rglob("*.pt")):
        try:
            load(p, mmap=True)
        except UnsafeCheckpointError:
            raise
        except ValueError:
            pass


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every torch.load of this process runs with weights_only=True and the
    allow-list, whatever its caller passes: DeepSpeed's load_checkpoint, its ZeRO
    optimizers, ds_to_universal, universal_checkpoint and zero_to_fp32 each call torch.load
    (weights_only=False) themselves, and which of them do changes between DeepSpeed
    versions. So rather than a checkpoint engine of ours (which only some of those paths
    use), torch's own switch, TORCH_FORCE_WEIGHTS_ONLY_LOAD, covers them all. Callers run
    check_files first, for an error that names the file; this closes the window between
    that check and DeepSpeed's reads."""
    _register_safe_globals()
    saved = {k: os.environ.get(k) for k in (_FORCE_WEIGHTS_ONLY, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # torch refuses both at once
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_trainer_state(ckpt: Path) -> dict:
    return load(Path(ckpt) / TRAINER_STATE)


def load_module_weights(ckpt: Path) -> dict:
    """Full module weights for evaluation, without DeepSpeed (ZeRO 0-2 keep them whole)."""
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no model states in {ckpt}")
    state = load(files[0])
    module = state.get("module")
    if not module:
        raise ValueError(f"{files[0]} holds no module weights (ZeRO-3 checkpoints need consolidation)")
    return module
