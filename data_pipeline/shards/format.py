"""The shard format's one owner: shard file names, image extensions and the atomic commit.

Per shard ``{id:05d}`` in a directory: ``.tar`` (webdataset samples), ``.parquet`` (one
status row per input row) and ``_stats.json``. Each file is written under a temporary
name (``.NAME.tmp-*``, never ``*.tar``) and renamed; ``_stats.json`` goes last, so its
presence means the shard is committed.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any, Callable

# The image members a sample may carry, in the order readers look for them.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# The same, as file-name suffixes (image folders).
IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTS)
# The formats ingest may encode to ("jpeg" is read, never written).
ENCODE_EXTS = tuple(ext for ext in IMAGE_EXTS if ext != "jpeg")


def shard_paths(output_dir: str, shard_id: int) -> dict[str, str]:
    base = f"{output_dir.rstrip('/')}/{shard_id:05d}"
    return {"tar": f"{base}.tar", "parquet": f"{base}.parquet", "stats": f"{base}_stats.json"}


def atomic_write(fs, path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(f)`` under a temporary name, then rename it into place;
    the temporary is removed if anything fails."""
    from fsspec.implementations.local import LocalFileSystem  # not at import: config uses this module

    directory, name = path.rsplit("/", 1)
    tmp = f"{directory}/.{name}.tmp-{uuid.uuid4().hex}"  # never matches *.tar / *.parquet
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, path)
        else:  # object stores have no rename; the stats file, written last, is the commit
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def committed_shards(fs, root: str) -> set[int]:
    """Ids of the committed shards in ``root`` (one listing, not one request per shard)."""
    if not fs.exists(root):
        return set()
    ids = set()
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith("_stats.json") and name[:-11].isdigit():
            ids.add(int(name[:-11]))
    return ids


def remove_stale_temporaries(fs, root: str) -> int:
    """Temporary files left by a killed run (``.NAME.tmp-*``); one driver per output dir."""
    if not fs.exists(root):  # an object store has no empty directories
        return 0
    stale = [p for p in fs.ls(root, detail=False) if ".tmp-" in p.rsplit("/", 1)[-1]]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
    return len(stale)


SIZES_FILE = "sizes.json"


def write_sizes(fs, root: str) -> dict[str, int]:
    """``sizes.json`` in ``root``: each committed tar's name -> its sample count (the stats'
    ``success``), the file OpenCLIP's webdataset loader reads to know an epoch's size
    without ``--train-num-samples``. Rewritten whole, atomically, after every run."""
    import json

    sizes = {}
    for sid in sorted(committed_shards(fs, root)):
        paths = shard_paths(root, sid)
        with fs.open(paths["stats"], "r") as f:
            sizes[paths["tar"].rsplit("/", 1)[-1]] = int(json.load(f)["success"])
    atomic_write(fs, f"{root.rstrip('/')}/{SIZES_FILE}", lambda f: f.write(json.dumps(sizes, indent=1).encode()))
    return sizes

