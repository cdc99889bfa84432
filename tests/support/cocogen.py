"""A small generated COCO-format detection set: coloured shapes on a noisy background, with proposals.

Categories are a coloured shape each ("red circle", "green square", ...). Each image holds a few
non-overlapping shapes; instances.json follows COCO (file names bare, the files in an
``images/`` sub-folder). The proposals file holds every ground-truth box jittered (IoU > 0.7)
with a high score, and false boxes on the background with a low one. ``single_shape``
renders the one-shape pictures a tiny model is trained on."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40),
           "purple": (150, 50, 200), "white": (250, 250, 250)}
# one colour per category, so a tiny model trained for seconds tells them apart (shape alone it does not learn)
CATEGORIES = ["red circle", "green square", "blue circle", "yellow square", "purple circle", "white square"]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    tone = rng.integers(100, 170)
    return np.clip(tone + rng.normal(0, 8, (size, size, 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)


def _draw(img: Image.Image, category: str, box: tuple[int, int, int, int]) -> None:
    colour, shape = category.split()
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=COLOURS[colour])
    else:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=COLOURS[colour])


def single_shape(rng: np.random.Generator, category: str, size: int) -> Image.Image:
    """One shape filling most of a size x size picture: what a region crop looks like."""
    img = Image.fromarray(_background(rng, size))
    side = int(rng.integers(size * 6 // 10, size * 9 // 10))
    x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
    _draw(img, category, (x, y, x + side, y + side))
    return img


def _place(rng: np.random.Generator, size: int, taken: list, lo: int, hi: int) -> tuple[int, int, int, int] | None:
    """A square box of side in [lo, hi) apart from every box in ``taken`` (2 px gap), or None."""
    for _ in range(50):
        side = int(rng.integers(lo, hi))
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        box = (x, y, x + side, y + side)
        if all(box[2] + 2 <= t[0] or t[2] + 2 <= box[0] or box[3] + 2 <= t[1] or t[3] + 2 <= box[1] for t in taken):
            return box
    return None


def write_coco(root: Path, n_images: int, *, size: int = 64, seed: int = 0) -> Path:
    """Writes root/images/*.png and root/instances.json (2 or 3 shapes an image); -> root."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        img = Image.fromarray(_background(rng, size))
        taken = []
        for _ in range(int(rng.integers(2, 4))):
            box = _place(rng, size, taken, size // 4, size * 2 // 5)
            if box is None:
                continue
            taken.append(box)
            category = int(rng.integers(len(CATEGORIES)))
            _draw(img, CATEGORIES[category], box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category + 1,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0})
        img.save(root / "images" / f"{i:04d}.png")
        images.append({"id": i + 1, "file_name": f"{i:04d}.png", "width": size, "height": size})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CATEGORIES)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": categories}))
    return root


def write_proposals(root: Path, out: Path, *, false_per_image: int = 1, seed: int = 1) -> Path:
    """Proposals for the set at ``root``: each ground-truth box jittered by at most 1/12 of
    its side (score 0.6 to 1), plus background boxes (score 0.05 to 0.4)."""
    rng = np.random.default_rng(seed)
    tree = json.loads((root / "instances.json").read_text())
    entries = []
    for ann in tree["annotations"]:
        x, y, w, h = ann["bbox"]
        dx, dy = rng.uniform(-w / 12, w / 12, 2)
        entries.append({"image_id": ann["image_id"], "bbox": [x + dx, y + dy, w, h],
                        "score": float(rng.uniform(0.6, 1.0))})
    for im in tree["images"]:
        taken = [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
                 for a in tree["annotations"] if a["image_id"] == im["id"]]
        for _ in range(false_per_image):
            box = _place(rng, im["width"], taken, 8, 14)
            if box is not None:
                taken.append(box)
                entries.append({"image_id": im["id"], "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "score": float(rng.uniform(0.05, 0.4))})
    out.write_text(json.dumps(entries))
    return out
