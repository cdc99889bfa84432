"""Committed shards as plain sample streams: listing a shard directory, iterating one tar.

Tar members are grouped by key with the standard library's streaming tarfile rather than
webdataset's internal iterators, so the readers do not depend on another library's
private layout."""
from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any, Iterator

import fsspec


def list_shards(path: str) -> list[str]:
    """Committed shards under `path` (a tar counts once its `_stats.json` exists), sorted."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise FileNotFoundError(f"shard directory not found: {path}")
    names = set(posixpath.basename(p) for p in fs.ls(root, detail=False))
    protocol = path.split("://", 1)[0] + "://" if "://" in path else ""
    shards = []
    for name in sorted(names):
        if name.endswith(".tar") and name[:-4] + "_stats.json" in names:
            shards.append(protocol + posixpath.join(root, name))
    if not shards:
        raise FileNotFoundError(f"no committed shards (*.tar with *_stats.json) in {path}")
    return shards


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Streams one shard as samples {"__key__": key, ext: bytes, ...}; json/txt decoded.
    A txt that is not UTF-8 or a json that does not parse is left out and the sample marked
    "__bad__": (reason, detail), so that one broken sample never ends the shard's stream
    (the consumer skips it: vlm.data.batches.BatchLoader, or says which sample is broken)."""
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            key, _, ext = base.partition(".")
            data = tar.extractfile(member).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__shard__": url}
            if ext == "json":
                try:
                    meta = json.loads(data)
                except ValueError as e:  # bad JSON or bad UTF-8
                    current.setdefault("__bad__", ("bad_metadata", f"{key}.json does not parse ({e})"))
                else:
                    if isinstance(meta, dict):
                        current["json"] = meta
                    else:
                        current.setdefault("__bad__", ("bad_metadata", f"{key}.json is not an object"))
            elif ext == "txt":
                try:
                    current["txt"] = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    current.setdefault("__bad__", ("bad_caption", f"{key}.txt is not UTF-8 ({e})"))
            else:
                current[ext] = data
        if current is not None:
            yield current
