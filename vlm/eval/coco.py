"""COCO-format detection data for `vlm eval --task detection`: annotations and proposals, validated.

A detection set is a COCO ``instances.json`` (or a directory holding one): ``images`` with
``id``, ``file_name``, ``width`` and ``height``; ``annotations`` with ``image_id``,
``category_id`` and ``bbox`` [x, y, w, h] in pixels of that width and height (``iscrowd``
optional); ``categories`` with ``id`` and ``name``. As in COCO, ``file_name`` is relative to
an image root: the JSON's folder unless one is given, and a bare name not found there is
looked up in its ``images/`` sub-folder. Boxes are read as fractions of the annotated width
and height, so a copy of an image at another resolution still fits its boxes.

Proposals are the COCO results format without a category: a JSON list of
``{"image_id": int, "bbox": [x, y, w, h], "score": float}`` (score optional, 1 when absent).
Every entry is checked here, so a bad file fails before any image is read, with an error
naming the entry."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

INSTANCES_FILE = "instances.json"
IMAGES_DIR = "images"
MAX_JSON_BYTES = 1 << 30  # an annotation or proposal file larger than this is refused unread


@dataclass
class CocoImage:
    """One image of the set: its id, file, annotated size and ground-truth boxes
    ([x, y, w, h] pixels, category index into CocoSet.categories, crowd flag)."""
    id: int
    file_name: str
    path: Path
    width: float
    height: float
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    crowd: list[bool] = field(default_factory=list)


@dataclass
class CocoSet:
    """A validated detection set: ``categories`` are (COCO id, name) in id order, ``images``
    in file order; ``dataset`` is the parsed JSON, complete for pycocotools (area and
    iscrowd filled in where missing)."""
    source: Path
    categories: list[tuple[int, str]]
    images: list[CocoImage]
    dataset: dict


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: larger than {MAX_JSON_BYTES} bytes; refused as {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None


def _number(value, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: '{name}' must be a finite number, got {value!r}")
    return float(value)


def _box(value, where: str) -> list[float]:
    """A [x, y, w, h] box with w, h > 0, or a ValueError naming ``where``."""
    if not isinstance(value, list) or len(value) != 4:
        raise ValueError(f"{where}: 'bbox' must be a list [x, y, w, h] of 4 numbers, got {value!r}")
    box = [_number(v, where, "bbox") for v in value]
    if box[2] <= 0 or box[3] <= 0:
        raise ValueError(f"{where}: 'bbox' {value!r} has no area (width and height must be > 0)")
    return box


def _field(entry, key: str, where: str):
    if not isinstance(entry, dict) or key not in entry:
        raise ValueError(f"{where}: needs the field '{key}'")
    return entry[key]


def _categories(tree: dict, source: Path) -> list[tuple[int, str]]:
    out, seen = [], set()
    for i, c in enumerate(tree["categories"]):
        where = f"{source} categories[{i}]"
        cid, name = _field(c, "id", where), _field(c, "name", where)
        if not isinstance(cid, int) or not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: 'id' must be an integer and 'name' a non-empty string")
        if cid in {k for k, _ in out} or name in seen:
            raise ValueError(f"{where}: category id {cid} or name {name!r} appears twice")
        out.append((cid, name)), seen.add(name)
    if not out:
        raise ValueError(f"{source}: no categories")
    return sorted(out)


def _image_path(root: Path, file_name: str) -> Path:
    path = root / file_name
    if not path.exists() and Path(file_name).name == file_name and (root / IMAGES_DIR / file_name).exists():
        return root / IMAGES_DIR / file_name
    return path


def _images(tree: dict, source: Path, root: Path) -> dict[int, CocoImage]:
    out: dict[int, CocoImage] = {}
    for i, im in enumerate(tree["images"]):
        where = f"{source} images[{i}]"
        iid, name = _field(im, "id", where), _field(im, "file_name", where)
        if not isinstance(iid, int) or iid in out:
            raise ValueError(f"{where}: 'id' must be an integer used by one image, got {iid!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: 'file_name' must be a non-empty string")
        width = _number(_field(im, "width", where), where, "width")
        height = _number(_field(im, "height", where), where, "height")
        if width <= 0 or height <= 0:
            raise ValueError(f"{where}: 'width' and 'height' must be > 0")
        out[iid] = CocoImage(iid, name, _image_path(root, name), width, height)
    return out


def load_coco(data: str | Path, image_root: str | Path | None = None) -> CocoSet:
    """``data``: an instances JSON or a directory holding instances.json -> the validated set.
    Every image, annotation and category is checked; an error names the entry."""
    source = Path(data)
    if source.is_dir():
        source = source / INSTANCES_FILE
    tree = _read_json(source, "COCO annotations (instances.json)")
    if not isinstance(tree, dict) or not all(isinstance(tree.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise ValueError(f"{source}: a COCO instances file needs the lists 'images', 'annotations' and 'categories'")
    categories = _categories(tree, source)
    index_of = {cid: i for i, (cid, _) in enumerate(categories)}
    images = _images(tree, source, Path(image_root) if image_root is not None else source.parent)
    for i, ann in enumerate(tree["annotations"]):
        where = f"{source} annotations[{i}]"
        iid, cid = _field(ann, "image_id", where), _field(ann, "category_id", where)
        if iid not in images:
            raise ValueError(f"{where}: 'image_id' {iid!r} is no image of the file")
        if cid not in index_of:
            raise ValueError(f"{where}: 'category_id' {cid!r} is no category of the file")
        box = _box(_field(ann, "bbox", where), where)
        ann.setdefault("id", i + 1)
        ann.setdefault("area", box[2] * box[3])
        ann.setdefault("iscrowd", 0)
        image = images[iid]
        image.boxes.append(box), image.labels.append(index_of[cid]), image.crowd.append(bool(ann["iscrowd"]))
    if not images:
        raise ValueError(f"{source}: no images")
    return CocoSet(source, categories, list(images.values()), tree)


def load_proposals(path: str | Path, coco: CocoSet) -> dict[int, tuple[list[list[float]], list[float]]]:
    """A proposals file (module docstring) -> {image id: (boxes [x, y, w, h], scores)}; every
    image of ``coco`` has an entry, empty where the file proposes nothing for it."""
    path = Path(path)
    entries = _read_json(path, "proposals file")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: proposals must be a JSON list of {{\"image_id\", \"bbox\" [x, y, w, h], "
                         f"\"score\"}} entries (COCO results without a category), got a {type(entries).__name__}")
    out = {im.id: ([], []) for im in coco.images}
    for i, entry in enumerate(entries):
        where = f"{path} entry {i}"
        iid = _field(entry, "image_id", where)
        if iid not in out:
            raise ValueError(f"{where}: 'image_id' {iid!r} is no image of {coco.source}")
        box = _box(_field(entry, "bbox", where), where)
        score = _number(entry.get("score", 1.0), where, "score")
        if score < 0:
            raise ValueError(f"{where}: 'score' must be >= 0, got {score}")
        out[iid][0].append(box), out[iid][1].append(score)
    return out
