"""Broken samples for the tests of bad-sample handling: a decompression bomb (a small PNG
declaring a huge all-black image), a truncated JPEG, a sample with no image and one whose
caption is not UTF-8; and a way to put them into a committed shard."""
from __future__ import annotations

import functools
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

from PIL import Image

BOMB_SIDE = 12000  # 144 megapixels: under Pillow's own hard limit (2 x 89.5M), so only our budget stops it


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid greyscale PNG of side x side black pixels, written by hand in ~0.5 s without
    ever holding the image: about 140 KB for 12000 x 12000."""
    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + one byte per pixel
    rows_per_chunk = max(1, (8 << 20) // len(row))
    parts, left = [], side
    while left:
        n = min(left, rows_per_chunk)
        parts.append(z.compress(row * n))
        left -= n
    parts.append(z.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def truncated_jpeg(size: int = 32) -> bytes:
    """A JPEG cut in half: its header reads, its pixels do not."""
    buf = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((size, size)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    return data[:len(data) // 2]


def bad_samples(prefix: str = "bad") -> dict[str, tuple[dict[str, bytes], str]]:
    """key -> (members {ext: bytes}, the reason the training loader gives)."""
    return {
        f"{prefix}bomb": ({"png": bomb_png(), "txt": b"a black square"}, "too_many_pixels"),
        f"{prefix}trunc": ({"jpg": truncated_jpeg(), "txt": b"a grey circle"}, "decode_error"),
        f"{prefix}noimage": ({"txt": b"a caption without a picture", "json": b"{}"}, "no_image"),
        f"{prefix}latin1": ({"jpg": _good_jpeg(), "txt": "un caf\xe9 cr\xe8me".encode("latin-1")}, "bad_caption"),
        f"{prefix}nocaption": ({"jpg": _good_jpeg()}, "no_caption"),
        f"{prefix}badjson": ({"jpg": _good_jpeg(), "txt": b"a red square", "json": b"{not json"}, "bad_metadata"),
    }


def _good_jpeg(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def add_to_shard(tar: Path, samples: dict[str, dict[str, bytes]], *, every: int = 3) -> None:
    """Rewrites a committed shard with `samples` ({key: {ext: bytes}}) inserted among its own
    (one after every `every` of them, the rest at the end)."""
    with tarfile.open(tar) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]
    by_key: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in members:
        by_key.setdefault(name.split(".", 1)[0], []).append((name, data))
    extra = [[(f"{key}.{ext}", data) for ext, data in parts.items()] for key, parts in samples.items()]
    out: list[tuple[str, bytes]] = []
    for i, group in enumerate(by_key.values()):
        out += group
        if (i + 1) % every == 0 and extra:
            out += extra.pop(0)
    for group in extra:
        out += group
    _write_tar(tar, out)


def write_bad_shard(tar: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A committed shard (with its _stats.json) holding only `samples`."""
    _write_tar(tar, [(f"{key}.{ext}", data) for key, parts in samples.items() for ext, data in parts.items()])
    tar.with_name(tar.name[:-4] + "_stats.json").write_text(json.dumps({"success": len(samples)}))
    return tar


def _write_tar(tar: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(tar, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
