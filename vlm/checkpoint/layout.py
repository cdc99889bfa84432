"""The names in a checkpoint directory: its files, its tags, and the rule that a name read from it stays inside.

Layout (DESIGN.md): {run_dir}/checkpoints/{tag}/ holds DeepSpeed's files, trainer_state.pt
(step, samples seen, every rank's reader and RNG state, resolved config, tokenizer) and
manifest.json (sizes and sha256 of every file). A tag without a manifest is incomplete
and never loaded. {run_dir}/checkpoints/latest names the newest complete tag and is
replaced atomically.

A file or tag name read from a manifest, a `latest` file or a store listing never leaves
its directory (checked_name, inside): a tampered one raises UnsafeCheckpointError, which is
never a reason to fall back to an older checkpoint: it is refused outright."""
from __future__ import annotations

import os
import re
from pathlib import Path

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that needs a global outside the allow-list, or a name (a manifest
    entry, `latest`, a tag) that would leave its directory: tampered with or foreign.
    For a file: `path` and what it `needs`."""

    def __init__(self, message: str, *, path: Path | None = None, needs: str | None = None):
        super().__init__(message)
        self.path, self.needs = path, needs


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def durable_write(path: Path, data: bytes) -> None:
    """`data` into a local file, fsynced under path.tmp then renamed into place: a reader
    sees the old file or the whole new one, also after a crash (save() skips *.tmp)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
