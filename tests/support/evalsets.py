"""Small evaluation fixtures shared by the tests: a tiny CLIP with its tokenizer, and a CSV
evaluation set of the demo corpus's held-out images."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from demo.corpus import heldout_pairs, make_caption, render_image_and_mask
from vlm.config import load_config

TINY = ["model.embed_dim=16", "model.vision.width=16", "model.vision.depth=2", "model.vision.heads=2",
        "model.vision.image_size=16", "model.vision.patch_size=4", "data.ingest.image_size=16",
        "model.text.width=16", "model.text.depth=1", "model.text.heads=2", "model.text.context_length=16",
        "eval.batch_size=4"]


def tiny_model(seed: int = 0, overrides=()):
    from vlm.models.registry import build_model
    from vlm.data.tokenizer import TextEncoder, train_tokenizer

    cfg = load_config(None, TINY + list(overrides))
    words = [c + " " + s for c, s in heldout_pairs()] + ["a photo of a plain background.", "an empty background."]
    tok = train_tokenizer(words * 5, vocab_size=120)
    torch.manual_seed(seed)
    return build_model(cfg.model, tok.get_vocab_size()).eval(), TextEncoder(tok, 16), cfg


def write_csv_set(root: Path, n: int, *, size: int = 32, captions_per_image: int = 1, masks: bool = True) -> Path:
    """n synthetic held-out images (+ masks) and a CSV: path, caption, label[, mask]."""
    rng = np.random.default_rng(1)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = heldout_pairs()[i % 3]
        pixels, bbox, tone, mask = render_image_and_mask(rng, colour, shape, size)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "img" / f"{i}.mask.png")
        for _ in range(captions_per_image):
            row = {"path": f"img/{i}.png", "caption": make_caption(rng, colour, shape, bbox, size, tone)[0],
                   "label": f"{colour} {shape}"}
            rows.append({**row, "mask": f"img/{i}.mask.png"} if masks else row)
    table = root / "data.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(), w.writerows(rows)
    return table

