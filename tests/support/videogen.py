"""A small action-recognition set encoded with PyAV: a shape moving left, right, up or down,
growing or shrinking.

The class is the motion (a direction, or growing or shrinking), so no single frame tells it: every clip starts at a
random place, in a random shape, size and colour. Clips are really encoded (MPEG-4 Part 2
in .mp4 by default; VP8 in .webm and MJPEG in .avi for other containers), so the evaluation
reads them through the same demuxers and decoders as a real dataset's."""
from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np

DIRECTIONS = {"moving_left": (-1, 0), "moving_right": (1, 0), "moving_up": (0, -1), "moving_down": (0, 1)}
SIZE_CHANGES = {"growing": 1, "shrinking": -1}  # the side's change over the clip, in steps of GROWTH px
GROWTH = 8
MOTIONS = (*DIRECTIONS, *SIZE_CHANGES)
# container suffix -> (encoder, pixel format)
CODECS = {".mp4": ("mpeg4", "yuv420p"), ".webm": ("libvpx", "yuv420p"), ".avi": ("mjpeg", "yuvj420p")}


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 8) -> Path:
    """Encodes [H, W, 3] uint8 frames into ``path``; the suffix picks the container and codec.
    With no frames, an .avi is a valid file whose video stream holds none."""
    codec, pix_fmt = CODECS[path.suffix]
    height, width = frames[0].shape[:2] if frames else (32, 32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.bit_rate = 4_000_000  # near-lossless at these sizes: the motion, not the codec, is the test
        container.start_encoding()   # the header, even for a clip of no frames
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def _ground(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A colour ramp (red grows to the right, green downwards) with a random tint."""
    ground = np.empty((height, width, 3))
    ground[..., 0] = np.linspace(0, 200, width)
    ground[..., 1] = np.linspace(0, 200, height)[:, None]
    ground[..., 2] = 60
    return (ground + rng.integers(0, 40, 3)).astype(np.uint8)


def _paste(img: np.ndarray, x: int, y: int, side: int, disc: bool, colour: np.ndarray) -> None:
    yy, xx = np.mgrid[:side, :side] - (side - 1) / 2
    inside = (yy ** 2 + xx ** 2 <= (side / 2) ** 2) if disc else np.ones((side, side), bool)
    img[y: y + side, x: x + side][inside] = colour


def motion_frames(rng: np.random.Generator, motion: str, *, n: int = 16, height: int = 32,
                  width: int = 40) -> list[np.ndarray]:
    """``n`` frames of a bright square or disc over the centre height x height square (the
    part the evaluation keeps) of a colour ramp, at a random place and size: moving in a
    direction, or growing or shrinking about a fixed centre. Halfway through the clip the
    shape is where (and as large as) any class could make it, so the middle frame alone
    does not tell the class."""
    ground, colour, disc = _ground(rng, height, width), rng.integers(180, 250, 3).astype(np.uint8), bool(rng.integers(2))
    left = (width - height) // 2
    frames = []
    if motion in SIZE_CHANGES:
        mid = int(rng.integers(8, 13))
        cx, cy = rng.integers(mid, height - mid, 2)
        for t in range(n):
            side = mid + SIZE_CHANGES[motion] * round(GROWTH * (t / (n - 1) - 0.5))
            img = ground.copy()
            _paste(img, left + cx - side // 2, cy - side // 2, side, disc, colour)
            frames.append(img)
        return frames
    dx, dy = DIRECTIONS[motion]
    side = int(rng.integers(7, 11))
    travel = (height - side) // 2                           # the distance covered over the clip
    lo, hi = 1 + travel // 2, height - side - 1 - travel // 2
    mid_along, across = rng.integers(lo, hi + 1, 2)         # the shape's corner halfway through
    for t in range(n):
        along = mid_along + (dx + dy) * round(travel * (t / (n - 1) - 0.5))
        x, y = (along, across) if dx else (across, along)
        img = ground.copy()
        _paste(img, left + x, y, side, disc, colour)
        frames.append(img)
    return frames


def write_motion_set(root: Path, per_class: int, *, seed: int = 0, other_suffix: str | None = ".webm",
                     table: bool = False) -> Path:
    """``per_class`` clips of each motion: ROOT/<direction>/<i>.mp4, or with ``table`` the
    clips in ROOT/clips/ and ROOT/clips.csv (path, label) -> the folder or the CSV. The
    first clip of each class uses ``other_suffix``'s container instead, when given."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(per_class):
        for direction in MOTIONS:
            suffix = other_suffix if i == 0 and other_suffix else ".mp4"
            rel = Path("clips" if table else direction) / f"{direction}_{i}{suffix}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            write_clip(root / rel, motion_frames(rng, direction))
            rows.append({"path": rel.as_posix(), "label": direction})
    if not table:
        return root
    with open(root / "clips.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label"])
        writer.writeheader(), writer.writerows(rows)
    return root / "clips.csv"
