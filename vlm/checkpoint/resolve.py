"""Resolving a checkpoint reference (run dir, tag, checkpoint dir, URL) to a verified local checkpoint directory."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import fsspec

from vlm.checkpoint.discover import checkpoint_root, complete_tags, read_latest, read_remote_latest, remote_tags
from vlm.checkpoint.layout import (LATEST, MANIFEST, TRAINER_STATE, UnsafeCheckpointError, checked_name, durable_write,
                                   inside, is_remote)
from vlm.checkpoint.safeload import check_files
from vlm.checkpoint.verify import matches, verify


def _whole(ckpt: Path, verify_files: bool) -> Path:
    """`ckpt` once its files are checked: against the manifest (verify_files) and as safe to load."""
    if verify_files:
        verify(ckpt)
    check_files(ckpt)
    return ckpt


def resolve(path: str, tag: str = "latest", *, verify_files: bool = False, warn=print) -> Path:
    """A run dir (+ tag, 'latest' by default) or a checkpoint dir -> a complete checkpoint dir
    whose every file loads as tensors and plain data (check_files).

    With verify_files, every file is checked against the manifest; when the newest
    checkpoint is truncated or corrupt, 'latest' falls back to the newest one that is
    whole, and `warn` is told which file was bad. A tampered one (UnsafeCheckpointError:
    a refused global, a name leaving its directory) is refused, never skipped."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return _whole(p, verify_files)
    root = checkpoint_root(p)
    if tag != "latest":
        ckpt = inside(root, tag, what="checkpoint tag", tag=True)
        if not (ckpt / MANIFEST).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} is incomplete or missing (no {MANIFEST})")
        return _whole(ckpt, verify_files)
    named = read_latest(root)
    named = inside(root, named, what="checkpoint tag", where=root / LATEST, tag=True) if named else None
    candidates = ([named] if named is not None else []) + [d for d in complete_tags(root) if d != named]
    for ckpt in candidates:
        try:
            if not (ckpt / MANIFEST).is_file():
                raise ValueError(f"checkpoint {ckpt} is incomplete: no {MANIFEST}")
            return _whole(ckpt, verify_files)
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


def _download(fs, url: str, remote: str, local: Path) -> Path:
    """One remote tag (`remote` in `fs`, `url` for messages) -> a verified local copy in `local`.
    Every file name in its manifest is checked before anything is written."""
    if not fs.exists(f"{remote}/{MANIFEST}"):
        raise ValueError(f"checkpoint {url} is incomplete: no {MANIFEST}")
    manifest = json.loads(fs.cat_file(f"{remote}/{MANIFEST}"))
    for rel in manifest["files"]:  # all of them, before anything is written
        checked_name(rel, what="file name", where=f"{url}/{MANIFEST}")
    local.mkdir(parents=True, exist_ok=True)
    for rel, meta in manifest["files"].items():
        dst = inside(local, rel, where=f"{url}/{MANIFEST}")
        if matches(dst, meta):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if fs.exists(f"{remote}/{rel}"):
            fs.get_file(f"{remote}/{rel}", str(dst))
        else:
            dst.unlink(missing_ok=True)
    durable_write(local / MANIFEST, json.dumps(manifest, indent=1).encode())
    return _whole(local, True)


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
        named = read_remote_latest(fs, base)
        names = ([named] if named else []) + [t for _, t in remote_tags(fs, base) if t != named]
    for name in names:
        checked_name(name, what="checkpoint tag", where=f"{root}/{LATEST}" if name == named else root, tag=True)
        local = inside(Path(cache), name, what="checkpoint tag", tag=True)
        try:
            return _download(fs, f"{root}/{name}", f"{base}/{name}", local)
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
