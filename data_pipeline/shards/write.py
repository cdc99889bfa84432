"""Writing webdataset tars with the standard library.

webdataset's TarWriter would do, but importing webdataset imports torch (seconds per
fresh Ray worker, paid by every ingest task); the format is plain tar: members
``{key}.{ext}``, one sample's members together. mtime and owner are fixed so the same
samples give the same bytes.
"""
from __future__ import annotations

import io
import json
import tarfile
from typing import Any, BinaryIO, Iterable


def _encode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, default=str, ensure_ascii=False).encode("utf-8")


def write_samples(f: BinaryIO, samples: Iterable[dict[str, Any]]) -> int:
    """Write ``{"__key__": key, ext: bytes | str | JSON-able}`` samples to ``f`` as one
    tar stream (works on object-store files that cannot seek); returns samples written."""
    n = 0
    with tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            if "." in key:
                raise ValueError(f"sample key {key!r} contains a dot")
            for ext, value in sample.items():
                if ext.startswith("__"):
                    continue
                data = _encode(value)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uname = info.gname = "vlm"
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n
