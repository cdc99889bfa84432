"""Evaluation data in three formats, read as one ordered stream of items.

- a **webdataset shard directory** (committed ``*.tar``): image, ``txt`` caption, class name
  from ``eval.label_template`` over the ``json`` metadata, and a mask from an optional
  ``mask.png`` entry;
- an **image folder** ``ROOT/<class>/<image>`` (jpg, jpeg, png, webp): the folder name is the
  class; ``<image stem>.mask.png`` beside an image is its mask; no captions;
- a **CSV** with a ``path`` column and ``caption`` and/or ``label`` columns, and optionally
  ``mask``; paths are relative to the CSV. Rows sharing a path are one image with several
  captions.

A mask is a single-channel (or RGB) image the size of its picture or any size: non-zero
pixels belong to the object of the item's class, zero pixels to the background.

Items come in a fixed order (shards in name order, then tar order; folders and files
sorted; CSV by first appearance of each path), so item ``i`` is the same on every rank and
a rank's share is ``i % world_size == rank``.

A dataset may ship its zero-shot class names and prompt templates in CLIP_benchmark's
layout: ``classnames.txt`` and ``zeroshot_classification_templates.txt`` in the folder root
or shard directory (or the directory above a shard directory, CLIP_benchmark's
``root/test/*.tar``), or beside the CSV (``beside_data``); vlm/eval/zeroshot.py decides what
they mean."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from data_pipeline.ingest.codec import Rejected, open_image
from data_pipeline.shards.format import IMAGE_EXTS, IMAGE_SUFFIXES
from data_pipeline.shards.samples import iter_tar_samples, list_shards
from vlm.data.batches import MAX_PIXELS
from vlm.data.pixels import centre_square, fit_square, to_uint8_hwc

MASK_SUFFIX = ".mask.png"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
MAX_LIST_BYTES = 16 << 20  # a class-name or template file larger than this is refused unread


@dataclass
class EvalItem:
    key: str
    captions: list[str]
    label: str | None
    image: bytes | Path | None = None   # encoded bytes (shards) or a file; None in metadata scans
    mask: bytes | Path | None = None
    has_mask: bool = False
    origin: str = ""                    # where the item came from, for error messages
    label_error: str | None = field(default=None, repr=False)


def detect_format(path: str) -> str:
    """-> "shards", "folder" or "csv"."""
    p = Path(path)
    if "://" in path or (p.is_dir() and any(p.glob("*.tar"))):
        return "shards"
    if p.is_file() and p.suffix.lower() == ".csv":
        return "csv"
    if p.is_dir() and any(c.is_dir() for c in p.iterdir()):
        return "folder"
    if not p.exists():
        raise FileNotFoundError(f"evaluation data not found: {path}")
    raise ValueError(f"{path}: not a shard directory (*.tar), an image folder (one sub-folder per "
                     f"class) or a .csv file")


def beside_data(path: str, name: str) -> Path | None:
    """The file ``name`` shipped with the dataset at ``path``: next to a CSV, in an image
    folder's root or a shard directory, or in the directory above a shard directory
    (CLIP_benchmark keeps its lists in ``root/`` and the shards in ``root/test/``)."""
    if "://" in path:
        return None
    p = Path(path)
    places = [p.parent] if p.is_file() else [p]
    if p.is_dir() and detect_format(path) == "shards":
        places.append(p.parent)
    return next((d / name for d in places if (d / name).is_file()), None)


def read_lines(file: str | Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of every line of a class-name or template file. Blank
    lines at the end are dropped; a blank line before the last entry is an error naming
    it, as it would shift every later line onto the wrong class."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    if file.stat().st_size > MAX_LIST_BYTES:
        raise ValueError(f"{file}: larger than {MAX_LIST_BYTES} bytes; not a class-name or template list")
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    blank = next((n for n, line in enumerate(lines, start=1) if not line.strip()), None)
    if blank is not None:
        raise ValueError(f"{file} line {blank}: blank line (one entry per line, no gaps)")
    if not lines:
        raise ValueError(f"{file}: empty")
    return [(n, line.strip()) for n, line in enumerate(lines, start=1)]


def iter_items(path: str, *, label_template: str, payload: bool = True) -> Iterator[EvalItem]:
    """Every item of the dataset in its fixed order. Without ``payload`` a shard item's image
    and mask bytes are dropped (a metadata scan); folder and CSV items only hold paths."""
    fmt = detect_format(path)
    if fmt == "shards":
        yield from _iter_shards(path, label_template, payload)
    elif fmt == "folder":
        yield from _iter_folder(Path(path))
    else:
        yield from _iter_csv(Path(path))


def _iter_shards(path: str, label_template: str, payload: bool) -> Iterator[EvalItem]:
    for shard in list_shards(path):
        for sample in iter_tar_samples(shard):
            origin = f"sample {sample['__key__']} in {shard}"
            label, error = None, None
            try:
                label = label_template.format(**sample.get("json", {}))
            except (KeyError, IndexError) as e:
                error = f"eval.label_template {label_template!r} needs metadata field {e} missing from {origin}"
            image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if image is None:
                raise ValueError(f"{origin} has no image")
            if "__bad__" in sample:  # a caption or metadata that did not decode (iter_tar_samples)
                raise ValueError(f"{origin}: {sample['__bad__'][1]}")
            caption = sample.get("txt")
            yield EvalItem(key=sample["__key__"], captions=[caption] if caption else [], label=label,
                           image=image if payload else None, mask=sample.get("mask.png") if payload else None,
                           has_mask="mask.png" in sample, origin=origin, label_error=error)


def _iter_folder(root: Path) -> Iterator[EvalItem]:
    for class_dir in sorted(c for c in root.iterdir() if c.is_dir()):
        for f in sorted(class_dir.iterdir()):
            if f.name.endswith(MASK_SUFFIX) or f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            mask = f.with_name(f.stem + MASK_SUFFIX)
            yield EvalItem(key=f"{class_dir.name}/{f.name}", captions=[], label=class_dir.name, image=f,
                           mask=mask if mask.is_file() else None, has_mask=mask.is_file(), origin=str(f))


def _iter_csv(table: Path) -> Iterator[EvalItem]:
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if "path" not in columns or not columns & {"caption", "label"}:
            raise ValueError(f"{table}: needs a 'path' column and a 'caption' and/or 'label' column "
                             f"(has: {', '.join(sorted(columns)) or 'none'})")
        items: dict[str, EvalItem] = {}
        for line, row in enumerate(reader, start=2):
            rel = (row.get("path") or "").strip()
            where = f"{table} line {line}"
            if not rel:
                raise ValueError(f"{where}: empty 'path'")
            item = items.get(rel)
            if item is None:
                image = table.parent / rel
                if not image.is_file():
                    raise FileNotFoundError(f"{where}: column 'path' names {rel!r}, which is not a file "
                                            f"(paths are relative to the CSV)")
                mask = None
                if (row.get("mask") or "").strip():
                    mask = table.parent / row["mask"].strip()
                    if not mask.is_file():
                        raise FileNotFoundError(f"{where}: column 'mask' names {row['mask']!r}, which is not a file")
                label = (row.get("label") or "").strip() or None
                item = items[rel] = EvalItem(key=rel, captions=[], label=label, image=image, mask=mask,
                                             has_mask=mask is not None, origin=where)
                if label is None and "label" in columns:
                    item.label_error = f"{where}: empty 'label'"
            elif (row.get("label") or "").strip() not in ("", item.label or ""):
                raise ValueError(f"{where}: column 'label' gives {row['label']!r} for {rel!r}, "
                                 f"which an earlier row labels {item.label!r}")
            caption = (row.get("caption") or "").strip()
            if caption:
                item.captions.append(caption)
    if not items:
        raise ValueError(f"{table}: no rows")
    yield from items.values()


def _read(source: bytes | Path) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _open(item: EvalItem, source: bytes | Path, what: str, max_pixels: int) -> Image.Image:
    """The decoded image, within ingest's pixel budget (read from the header before any
    pixel is decoded); an image that breaks it or does not decode fails the evaluation with
    a ValueError naming the item, as every bad input of an evaluation does."""
    try:
        img = open_image(_read(source), max_pixels)
        img.load()
        return img
    except Rejected as e:
        if e.reason == "too_many_pixels":
            raise ValueError(f"{item.origin}: the {what} has too many pixels ({e}; the budget is "
                             f"data.ingest.max_pixels)") from None
        raise ValueError(f"{item.origin}: cannot decode the {what} ({e})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises several types for a bad file
        raise ValueError(f"{item.origin}: cannot decode the {what} ({e})") from None


def load_image(item: EvalItem, image_size: int, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """-> [S, S, 3] uint8 through the evaluation transform (vlm.data.pixels.fit_square: resized,
    centre-cropped); vlm.data.pixels.normalise makes a batch of them the model's input."""
    return to_uint8_hwc(fit_square(_open(item, item.image, "image", max_pixels).convert("RGB"), image_size))


def load_mask(item: EvalItem, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """-> bool [H, W] at the mask's own resolution, True on the object; the centre square of
    a non-square mask, the part of the picture that load_image keeps."""
    img = _open(item, item.mask, "mask", max_pixels).convert("L")
    if img.width != img.height:
        img = img.crop(tuple(round(v) for v in centre_square(*img.size)))
    return torch.from_numpy(np.asarray(img) > 0)
