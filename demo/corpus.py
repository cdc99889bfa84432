"""A procedural image–caption corpus: one coloured shape per image, deterministic from a seed.

Six colours × six shapes give 36 combinations; 12 of them are held out of training so
zero-shot evaluation can test compositional generalisation ("a photo of a red star."
when the model only saw red things and stars separately). Captions vary in template,
synonyms, size and position words so the text tower cannot just memorise one string.
The tables written from it (URL table, mask table) are in demo.tables.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo.config import CorpusConfig

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 225, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

# Base words stay the most likely choice because zero-shot prompts use them.
_COLOUR_SYNONYMS = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "grassy"),
    "blue": ("azure", "cobalt"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "plum"),
    "orange": ("tangerine", "amber"),
}
_SHAPE_SYNONYMS = {
    "circle": ("disc", "dot"),
    "square": ("box", "block"),
    "triangle": ("wedge", "three-sided shape"),
    "star": ("five-pointed star", "starburst"),
    "cross": ("plus sign", "plus"),
    "diamond": ("rhombus", "lozenge"),
}
_BASE_WORD_PROB = 0.6
_SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
_BACKGROUND_WORDS = {"light": ("light", "pale", "bright"), "dark": ("dark", "dim", "black")}

# {x} is the article + object phrase ("an orange star"), {obj} the phrase alone,
# {where} a position phrase ("in the top left"), {bg} a background word.
_TEMPLATES: tuple[str, ...] = (
    "{X}.",
    "a photo of {x}.",
    "a picture of {x}.",
    "an image showing {x}.",
    "{X} on a {bg} background.",
    "there is {x} in this picture.",
    "a simple drawing of {x}.",
    "a close-up of {x}.",
    "this is {x}.",
    "a single {obj}, nothing else.",
    "one {obj} against a {bg} backdrop.",
    "a rendering of {x}.",
    "a computer drawing of {x} with a noisy texture.",
    "the {obj}.",
    "an illustration of {x}.",
    "look, {x}!",
    "my favourite shape: {x}.",
)
_POSITION_TEMPLATES: tuple[str, ...] = (
    "{X} {where}.",
    "a photo of {x} {where}.",
    "{Where}, {x}.",
    "there is {x} {where} of the image.",
    "a picture with {x} {where}.",
)
NUM_TEMPLATES = len(_TEMPLATES) + len(_POSITION_TEMPLATES)
_SPLIT_IDS = {"train": 0, "heldout": 1}


def heldout_pairs() -> list[tuple[str, str]]:
    """The 12 (colour, shape) pairs never seen in training; each colour and shape twice."""
    colours = list(COLOURS)
    return [
        (c, s)
        for ci, c in enumerate(colours)
        for si, s in enumerate(SHAPES)
        if (si - ci) % 6 in (0, 3)
    ]


def train_pairs() -> list[tuple[str, str]]:
    """The 24 (colour, shape) pairs used for training."""
    held = set(heldout_pairs())
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]


@dataclass
class Corpus:
    """Where the images live and one record per image (path relative to ``root``)."""

    root: Path
    records: list[dict]
    cfg: CorpusConfig = field(default_factory=CorpusConfig)

    def split(self, name: str) -> list[dict]:
        return [r for r in self.records if r["split"] == name]


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    tone = "light" if rng.random() < 0.5 else "dark"
    lo, hi = (185, 255) if tone == "light" else (0, 70)
    start = rng.integers(lo, hi, size=3).astype(np.float32)
    if rng.random() < 0.5:
        end = rng.integers(lo, hi, size=3).astype(np.float32)
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        ramp = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
        img = start + (end - start) * ramp
        img = np.broadcast_to(img, (size, size, 3))
    else:
        img = np.broadcast_to(start, (size, size, 3))
    return np.ascontiguousarray(img, dtype=np.float32), tone


def _star_points(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = angle + k * np.pi / 5
        pts.append((cx + rad * np.sin(a), cy - rad * np.cos(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb, angle):
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, r, angle), fill=rgb)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle((x0, cy - t, x1, cy + t), fill=rgb)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_image(rng: np.random.Generator, colour: str, shape: str, size: int):
    """Draw one image; returns (uint8 array [H, W, 3], bbox [x0, y0, x1, y1], background tone)."""
    pixels, bbox, tone, _ = render_image_and_mask(rng, colour, shape, size)
    return pixels, bbox, tone


def render_image_and_mask(rng: np.random.Generator, colour: str, shape: str, size: int):
    """As render_image, plus the shape's exact mask (bool [H, W]) drawn with the same geometry.

    Draws the same random numbers as render_image, so the image is byte-identical."""
    bg, tone = _background(rng, size)
    side = int(round(size * rng.uniform(0.35, 0.70)))
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    bbox = [x0, y0, x0 + side - 1, y0 + side - 1]
    canvas = Image.fromarray(bg.astype(np.uint8))
    jitter = rng.integers(-20, 21, size=3)
    rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
    angle = float(rng.uniform(-0.3, 0.3))
    _draw_shape(ImageDraw.Draw(canvas), shape, tuple(bbox), rgb, angle)
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, tuple(bbox), 255, angle)
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels += rng.normal(0.0, 6.0, size=pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8), bbox, tone, np.asarray(mask) > 0


def _pick(rng: np.random.Generator, base: str, synonyms: tuple[str, ...]) -> str:
    if rng.random() < _BASE_WORD_PROB:
        return base
    return synonyms[int(rng.integers(len(synonyms)))]


def _position_phrase(bbox: list[int], size: int) -> str:
    cx = (bbox[0] + bbox[2]) / 2 / size
    cy = (bbox[1] + bbox[3]) / 2 / size
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    if row and col:
        return f"in the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the centre"


def make_caption(
    rng: np.random.Generator, colour: str, shape: str, bbox: list[int], size: int, tone: str
) -> tuple[str, int]:
    """A caption consistent with the drawn geometry, and the index of the template used."""
    words = [
        _pick(rng, colour, _COLOUR_SYNONYMS[colour]),
        _pick(rng, shape, _SHAPE_SYNONYMS[shape]),
    ]
    frac = (bbox[2] - bbox[0] + 1) / size
    size_class = "small" if frac < 0.45 else "large" if frac > 0.6 else None
    if size_class and rng.random() < 0.5:
        options = _SIZE_WORDS[size_class]
        words.insert(0, options[int(rng.integers(len(options)))])
    obj = " ".join(words)
    x = ("an " if obj[0] in "aeiou" else "a ") + obj
    bg_words = _BACKGROUND_WORDS[tone]
    fields = {
        "obj": obj,
        "x": x,
        "X": x[0].upper() + x[1:],
        "bg": bg_words[int(rng.integers(len(bg_words)))],
    }
    if rng.random() < 0.35:
        idx = int(rng.integers(len(_POSITION_TEMPLATES)))
        where = _position_phrase(bbox, size)
        fields.update(where=where, Where=where[0].upper() + where[1:])
        return _POSITION_TEMPLATES[idx].format(**fields), len(_TEMPLATES) + idx
    idx = int(rng.integers(len(_TEMPLATES)))
    return _TEMPLATES[idx].format(**fields), idx


def region_phrase(colour: str, shape: str) -> str:
    """The phrase naming one drawn shape (what region–word matching aligns a box with)."""
    return f"{colour} {shape}"


def regions_of(bbox: list[int], colour: str, shape: str, size: int) -> list[dict]:
    """One region per drawn shape: {"box": [x0, y0, x1, y1] as fractions of the image side
    (the pixel box with exclusive right/bottom edges, so it survives any resize of the
    square image), "phrase": "red circle"}."""
    x0, y0, x1, y1 = bbox
    box = [x0 / size, y0 / size, (x1 + 1) / size, (y1 + 1) / size]
    return [{"box": box, "phrase": region_phrase(colour, shape)}]


def word_synonyms() -> dict[str, tuple[str, ...]]:
    """Every colour and shape word -> the words captions may use for it (itself first)."""
    return {w: (w, *syn) for table in (_COLOUR_SYNONYMS, _SHAPE_SYNONYMS) for w, syn in table.items()}


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One generator per image: the corpus is the same whatever order images are made in.
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _sample(seed: int, split: str, index: int, pairs, size: int) -> tuple[bytes, dict]:
    rng = _sample_rng(seed, split, index)
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    pixels, bbox, tone = render_image(rng, colour, shape, size)
    caption, template = make_caption(rng, colour, shape, bbox, size, tone)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    record = {
        "path": f"images/{split}/{index:06d}.png",
        "caption": caption,
        "colour": colour,
        "shape": shape,
        "split": split,
        "bbox": bbox,
        "template": template,
        "regions": regions_of(bbox, colour, shape, size),
    }
    return buf.getvalue(), record


def unseen_samples(cfg: CorpusConfig, count: int, split: str = "train"):
    """`count` new images of the `split`'s (colour, shape) pairs, drawn after the corpus's
    own indices (from num_train, or num_heldout), so none is part of the corpus: for
    training pairs, held-out images of seen combinations. Yields (PNG bytes, record)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(_SPLIT_IDS)}")
    pairs = train_pairs() if split == "train" else heldout_pairs()
    start = cfg.num_train if split == "train" else cfg.num_heldout
    for index in range(start, start + count):
        yield _sample(cfg.seed, split, index, pairs, cfg.image_size)


def generate_corpus(cfg: CorpusConfig, out_dir: str | os.PathLike) -> Corpus:
    """Write ``out_dir/images/{split}/{index:06d}.png`` and return the records."""
    root = Path(out_dir)
    records = []
    for split, count, pairs in (
        ("train", cfg.num_train, train_pairs()),
        ("heldout", cfg.num_heldout, heldout_pairs()),
    ):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            data, record = _sample(cfg.seed, split, index, pairs, cfg.image_size)
            (root / record["path"]).write_bytes(data)
            records.append(record)
    return Corpus(root=root, records=records, cfg=cfg)


def render_mask(corpus: Corpus, record: dict) -> np.ndarray:
    """The exact mask (bool [H, W], True on the shape) of one of ``corpus``'s records,
    re-drawn from the record's own generator (the star's rotation is not in the record)."""
    split, name = record["path"].split("/")[-2:]
    index = int(name.split(".")[0])
    pairs = train_pairs() if split == "train" else heldout_pairs()
    rng = _sample_rng(corpus.cfg.seed, split, index)
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    *_, mask = render_image_and_mask(rng, colour, shape, corpus.cfg.image_size)
    return mask
