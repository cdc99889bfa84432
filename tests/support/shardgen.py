"""Writes small committed shard sets straight from the procedural corpus (no HTTP, no Ray),
for tests of the reader, engine and evaluation; and the tiny model the e2e runs train."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from demo.corpus import heldout_pairs, make_caption, render_image, train_pairs


def write_shards(out: Path, *, n: int, per_shard: int, split: str = "train", image_size: int = 32,
                 seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pairs = train_pairs() if split == "train" else heldout_pairs()
    rng = np.random.default_rng(seed)
    paths = []
    for shard_id, start in enumerate(range(0, n, per_shard)):
        tar = out / f"{shard_id:05d}.tar"
        with wds.TarWriter(str(tar)) as w:
            for i in range(start, min(n, start + per_shard)):
                colour, shape = pairs[int(rng.integers(len(pairs)))]
                pixels, bbox, tone = render_image(rng, colour, shape, 64)
                caption, _ = make_caption(rng, colour, shape, bbox, 64, tone)
                buf = io.BytesIO()
                Image.fromarray(pixels).resize((image_size, image_size)).save(buf, format="JPEG", quality=95)
                w.write({"__key__": f"{shard_id:05d}{i:05d}", "jpg": buf.getvalue(), "txt": caption,
                         "json": {"colour": colour, "shape": shape, "label": f"{colour} {shape}", "index": i}})
        (out / f"{shard_id:05d}_stats.json").write_text(json.dumps({"success": min(n, start + per_shard) - start}))
        paths.append(tar)
    return paths


# The smallest model the e2e `vlm train` runs use: seconds per run on 2 CPU cores.
TINY_MODEL = ("model.embed_dim=32", "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
              "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "tokenizer.vocab_size=300")


def set_args(*overrides: str) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]"""
    return [arg for o in overrides for arg in ("--set", o)]


def shards_with_tokenizer(root: Path, *, n: int, per_shard: int) -> tuple[Path, Path, Path]:
    """Training shards under root/shards and the BPE tokenizer the tiny model's runs share
    (trained once on their captions) -> (root, shards, tokenizer.json)."""
    from vlm.data.tokenizer import prepare_tokenizer
    from vlm.config import load_config

    shards = root / "shards"
    write_shards(shards, n=n, per_shard=per_shard)
    cfg = load_config(None, [*TINY_MODEL, f"run_dir={root / 'tok'}", f"data.train_shards={shards}"])
    prepare_tokenizer(cfg)
    return root, shards, root / "tok" / "tokenizer.json"
