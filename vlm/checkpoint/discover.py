"""Finding checkpoints: a run's checkpoint root, the tag `latest` names, and its tags (local or remote)."""
from __future__ import annotations

import json
from pathlib import Path

from vlm.checkpoint.layout import LATEST, MANIFEST, is_remote


def checkpoint_root(path: str | Path) -> Path:
    """RUN_DIR/checkpoints when there is one, else the path itself (taken to be that directory)."""
    p = Path(path)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def find_root(run_dir: str) -> Path:
    """RUN_DIR/checkpoints, or RUN_DIR itself when it is that directory; FileNotFoundError
    when it is neither."""
    p = Path(run_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if (p / LATEST).is_file() or any((d / MANIFEST).is_file() for d in p.iterdir() if d.is_dir()):
        return p
    raise FileNotFoundError(f"{run_dir} has no checkpoints/ directory: is it a run directory?")


def read_latest(root: Path) -> str | None:
    """The tag root/latest names, as written (unchecked); None without a `latest` file."""
    f = Path(root) / LATEST
    return f.read_text().strip() if f.is_file() else None


def read_remote_latest(fs, base: str) -> str | None:
    """read_latest() for a remote checkpoint directory (`fs`, `base` from fsspec's url_to_fs)."""
    return fs.cat_file(f"{base}/{LATEST}").decode().strip() if fs.exists(f"{base}/{LATEST}") else None


def tag_dirs(root: Path) -> list[Path]:
    """Every tag directory under `root`, complete or not, in no particular order."""
    return [d for d in Path(root).iterdir() if d.is_dir()]


def complete_tags(root: Path) -> list[Path]:
    """Checkpoint dirs under `root` that have a manifest, newest step first."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and (d / MANIFEST).is_file()]
    return sorted(dirs, key=lambda d: json.loads((d / MANIFEST).read_text())["step"], reverse=True)


def remote_tags(fs, base: str) -> list[tuple[int, str]]:
    """(step, tag) of every remote tag with a manifest, newest first."""
    out = []
    for d in fs.ls(base, detail=False):
        name = d.rstrip("/").rsplit("/", 1)[-1]
        if fs.exists(f"{base}/{name}/{MANIFEST}"):
            out.append((json.loads(fs.cat_file(f"{base}/{name}/{MANIFEST}"))["step"], name))
    return sorted(out, reverse=True)


def has_checkpoint(root: str) -> bool:
    """Whether a checkpoint directory (local or remote) holds at least one complete
    checkpoint: what `--resume auto` asks before deciding between resuming and starting."""
    if is_remote(root):
        import fsspec

        fs, base = fsspec.core.url_to_fs(root)
        return fs.exists(base) and bool(remote_tags(fs, base.rstrip("/")))
    return Path(root).is_dir() and bool(complete_tags(Path(root)))
