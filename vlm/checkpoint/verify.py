"""Manifests: writing one (every file's size and sha256, written last) and checking a checkpoint's files against it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vlm.checkpoint.layout import MANIFEST, durable_write, inside


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_meta(path: Path) -> dict:
    """A manifest entry: the file's size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def matches(path: Path, meta: dict, *, checksums: bool = True) -> bool:
    """Whether `path` is a file of the manifest entry's size (and, with checksums, sha256)."""
    return path.is_file() and path.stat().st_size == meta["bytes"] and (
        not checksums or sha256_file(path) == meta["sha256"])


def manifest_bytes(tag: str, step: int, files: dict) -> bytes:
    return json.dumps({"tag": tag, "step": step, "files": dict(sorted(files.items()))}, indent=1).encode()


def write_manifest(ckpt: Path, step: int) -> None:
    """Sizes and sha256 of every file in `ckpt`, written last: its presence marks the
    checkpoint complete."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"tag": ckpt.name, "step": step, "files": {
        str(p.relative_to(ckpt)): file_meta(p) for p in files}}
    durable_write(ckpt / MANIFEST, json.dumps(manifest, indent=1).encode())


def verify(ckpt: Path, *, checksums: bool = True) -> None:
    """Raises if a file listed in the manifest is missing or differs (in size, and with
    checksums in sha256: without, a quick check of large checkpoints)."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        p = inside(ckpt, name, where=ckpt / MANIFEST)
        if not matches(p, meta, checksums=checksums):
            raise ValueError(f"checkpoint {ckpt} is corrupt: {name} does not match its manifest")
