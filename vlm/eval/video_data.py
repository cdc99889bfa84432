"""Video evaluation data: listing the clips of a folder or CSV, and decoding each into frames within bounds.

Two layouts, as for images (vlm/eval/datasets.py): a **clip folder** ``ROOT/<class>/<clip>``
(mp4, m4v, mov, mkv, webm, avi; the folder name is the class), or a **CSV** with columns
``path`` and ``label`` (paths relative to the CSV, read by datasets.iter_items). Clips come
in a fixed order (folders and files sorted; CSV rows in order). classnames.txt and
zeroshot_classification_templates.txt beside the data name and prompt the classes, as for
images.

A clip is decoded with PyAV (FFmpeg's demuxers and decoders, shipped in its wheel) and
subsampled into ``frames`` frames: uniformly (the middle frame of each of ``frames`` equal
parts of the clip) or, with a ``stride``, every stride-th frame of a window centred in the
clip (the last frame repeated where a clip is shorter than the window). Each frame goes
through the evaluation image transform (vlm.data.pixels.fit_square: resized and
centre-cropped to the model's size).

Decoding is bounded as image decoding is (`VideoLimits`): the file's bytes (before it is
opened), the pixels of a frame (from the stream header before any frame decodes, and again
on every frame), the frames of a clip (counted from the demuxed packets, before decoding)
and the wall-clock seconds spent on it. A clip that breaks a bound, does not open or decode,
or holds no frame is `Unreadable`: the evaluation skips it and names it with the reason."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm.data.pixels import fit_square, to_uint8_hwc
from vlm.eval.datasets import detect_format, iter_items

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")


@dataclass(frozen=True)
class VideoLimits:
    """The bounds on decoding one clip; a clip over any of them is skipped, not read."""
    max_bytes: int = 512 << 20          # the file's size
    max_pixels: int = 4096 * 4096       # one frame's width x height
    max_frames: int = 10_000            # frames in the clip (about 5.5 min at 30 fps)
    max_seconds: float = 60.0           # wall clock to count and decode the clip


@dataclass(frozen=True)
class Clip:
    """One clip of a video evaluation set: its file, its label and where it was listed."""
    path: Path
    label: str
    origin: str


class Unreadable(Exception):
    """A clip that cannot be used: str(e) is the reason, shown in results["skipped"]."""


def list_clips(path: str) -> list[Clip]:
    """Every clip of the data at ``path`` (a clip folder or a CSV with path and label) in its
    fixed order. A CSV row without a label, or naming a file that does not exist, is an
    error naming the row."""
    fmt = detect_format(path)
    if fmt == "folder":
        root = Path(path)
        return [Clip(f, class_dir.name, str(f)) for class_dir in sorted(c for c in root.iterdir() if c.is_dir())
                for f in sorted(class_dir.iterdir()) if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES]
    if fmt != "csv":
        raise ValueError(f"{path}: video data is a folder of clips (one sub-folder per class) or a .csv with "
                         f"columns path and label, not a shard directory")
    clips = []
    for item in iter_items(path, label_template="{label}", payload=False):  # the template reads shards only
        if item.label is None:
            raise ValueError(item.label_error or f"{item.origin}: no 'label' (video tasks need one for every clip)")
        clips.append(Clip(Path(item.image), item.label, item.origin))
    return clips


def frame_indices(total: int, frames: int, stride: int | None = None) -> list[int]:
    """The ``frames`` positions (0-based, in display order) taken from a clip of ``total``
    frames: the middle of each of ``frames`` equal parts, or with ``stride`` every stride-th
    frame of a window centred in the clip, clipped to its last frame."""
    if stride is None:
        return [(2 * i + 1) * total // (2 * frames) for i in range(frames)]
    start = max(0, (total - (frames - 1) * stride - 1) // 2)
    return [min(total - 1, start + i * stride) for i in range(frames)]


def decode_clip(path: Path, *, frames: int, image_size: int, stride: int | None = None,
                limits: VideoLimits = VideoLimits()) -> torch.Tensor:
    """-> [frames, S, S, 3] uint8, each frame through the evaluation transform; raises
    Unreadable (with the reason) for a clip that breaks a bound or does not decode."""
    import av

    size = path.stat().st_size if path.is_file() else None
    if size is None:
        raise Unreadable("not a file")
    if size > limits.max_bytes:
        raise Unreadable(f"{size} bytes, over the bound of {limits.max_bytes}")
    deadline = time.monotonic() + limits.max_seconds
    try:
        total = _count_frames(path, limits, deadline)
        wanted = frame_indices(total, frames, stride)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            picked = _decode_wanted(container.decode(stream), sorted(set(wanted)), image_size, limits, deadline)
    except Unreadable:
        raise
    except Exception as e:  # noqa: BLE001 - FFmpeg's errors for a bad file come as several types
        raise Unreadable(f"does not decode ({type(e).__name__}: {e})") from None
    last = max(picked)  # a clip whose decoder gives fewer frames than its packets: the last one stands in
    return torch.stack([picked.get(i, picked[last]) for i in wanted])


def _count_frames(path: Path, limits: VideoLimits, deadline: float) -> int:
    """The frames of the clip's first video stream, counted from its packets (no decoding),
    after its frame size is checked against the bound."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise Unreadable("no video stream")
        stream = container.streams.video[0]
        pixels = stream.codec_context.width * stream.codec_context.height
        if pixels > limits.max_pixels:
            raise Unreadable(f"{stream.codec_context.width}x{stream.codec_context.height} frames, over the bound "
                             f"of {limits.max_pixels} pixels")
        total = 0
        for packet in container.demux(stream):
            total += packet.size > 0
            if total > limits.max_frames:
                raise Unreadable(f"more than {limits.max_frames} frames")
            _check_time(deadline, limits)
    if total == 0:
        raise Unreadable("no frames")
    return total


def _decode_wanted(decoded, wanted: list[int], image_size: int, limits: VideoLimits,
                   deadline: float) -> dict[int, torch.Tensor]:
    """{position: [S, S, 3] uint8} of the ``wanted`` positions (sorted) among the decoded
    frames; decoding stops after the last one."""
    picked: dict[int, torch.Tensor] = {}
    for position, frame in enumerate(decoded):
        if frame.width * frame.height > limits.max_pixels:
            raise Unreadable(f"a {frame.width}x{frame.height} frame, over the bound of {limits.max_pixels} pixels")
        if position in wanted:
            picked[position] = to_uint8_hwc(fit_square(frame.to_image(), image_size))
        if position >= wanted[-1]:
            break
        _check_time(deadline, limits)
    if not picked:
        raise Unreadable("no frame decodes")
    return picked


def _check_time(deadline: float, limits: VideoLimits) -> None:
    if time.monotonic() > deadline:
        raise Unreadable(f"took longer than {limits.max_seconds:g} s to decode")
