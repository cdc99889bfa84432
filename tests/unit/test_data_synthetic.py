"""The procedural colour/shape corpus: determinism, held-out split, caption quality."""

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from demo.config import CorpusConfig
from demo.server import BROKEN_ENDPOINTS
from demo.corpus import (
    COLOURS,
    NUM_TEMPLATES,
    SHAPES,
    generate_corpus,
    heldout_pairs,
    train_pairs,
)
from demo.tables import write_url_table


def _snapshot(corpus):
    root = corpus.root
    return [(r["caption"], r["bbox"], (root / r["path"]).read_bytes()) for r in corpus.records]


@pytest.fixture(scope="module")
def corpus500(tmp_path_factory):
    cfg = CorpusConfig(num_train=500, num_heldout=60)
    return generate_corpus(cfg, tmp_path_factory.mktemp("c500"))


def test_same_seed_same_bytes_and_captions_different_seed_differs(tmp_path):
    cfg = CorpusConfig(seed=7, num_train=30, num_heldout=12, image_size=48)
    a = generate_corpus(cfg, tmp_path / "a")
    b = generate_corpus(cfg, tmp_path / "b")
    c = generate_corpus(cfg.model_copy(update={"seed": 8}), tmp_path / "c")
    assert _snapshot(a) == _snapshot(b)
    assert [r["path"] for r in a.records] == [r["path"] for r in c.records]
    differing = sum(x != y for x, y in zip(_snapshot(a), _snapshot(c)))
    assert differing == len(a.records)


def test_heldout_pairs_cover_each_colour_and_shape_twice():
    held = heldout_pairs()
    assert len(held) == len(set(held)) == 12
    assert Counter(c for c, _ in held) == {c: 2 for c in COLOURS}
    assert Counter(s for _, s in held) == {s: 2 for s in SHAPES}
    assert len(train_pairs()) == 24 and not set(train_pairs()) & set(held)


def test_splits_respect_heldout_pairs(corpus500):
    held = set(heldout_pairs())
    train = corpus500.split("train")
    heldout = corpus500.split("heldout")
    assert len(train) == 500 and len(heldout) == 60
    assert all((r["colour"], r["shape"]) not in held for r in train)
    assert all((r["colour"], r["shape"]) in held for r in heldout)
    # every training combination is actually used
    assert {(r["colour"], r["shape"]) for r in train} == set(train_pairs())


def test_images_show_the_named_colour_inside_the_bbox(corpus500):
    for r in corpus500.records[:200]:
        img = np.asarray(Image.open(corpus500.root / r["path"]))
        assert img.shape == (64, 64, 3)
        x0, y0, x1, y1 = r["bbox"]
        side = x1 - x0 + 1
        assert 0 <= x0 < x1 < 64 and 0 <= y0 < y1 < 64 and y1 - y0 + 1 == side
        assert 0.3 * 64 <= side <= 0.75 * 64
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        centre = img[cy - 1 : cy + 2, cx - 1 : cx + 2]
        mean = centre.reshape(-1, 3).mean(0)
        nearest = min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c])))
        assert nearest == r["colour"], (r, mean)


def test_caption_diversity_and_base_words(corpus500):
    records = corpus500.records[:500]
    captions = [r["caption"] for r in records]
    assert len({r["template"] for r in records}) >= 15
    assert NUM_TEMPLATES >= 15
    assert len(set(captions)) > 200
    colour_base = sum(r["colour"] in r["caption"].lower().split() for r in records)
    shape_base = sum(r["shape"] in r["caption"].lower() for r in records)
    assert colour_base >= 0.5 * len(records)
    assert shape_base >= 0.5 * len(records)


def test_size_and_position_words_match_the_geometry(corpus500):
    checked = 0
    for r in corpus500.records:
        words = r["caption"].lower().replace(",", " ").replace(".", " ").split()
        x0, y0, x1, y1 = r["bbox"]
        frac = (x1 - x0 + 1) / 64
        cx, cy = (x0 + x1) / 2 / 64, (y0 + y1) / 2 / 64
        if {"small", "tiny", "little"} & set(words):
            assert frac < 0.45
        if {"large", "big", "huge"} & set(words):
            assert frac > 0.6
        if "top" in words:
            assert cy < 1 / 3
            checked += 1
        if "bottom" in words:
            assert cy > 2 / 3
        if "left" in words:
            assert cx < 1 / 3
        if "right" in words:
            assert cx > 2 / 3
    assert checked > 0


def test_write_url_table_with_broken_rows(corpus500, tmp_path):
    path = tmp_path / "urls.parquet"
    base = "http://127.0.0.1:9"
    n = write_url_table(corpus500, base, str(path), split="heldout", include_broken=True)
    table = pq.read_table(path)
    assert n == table.num_rows == 60 + len(BROKEN_ENDPOINTS)
    assert table.column_names == ["url", "caption", "colour", "shape", "label", "split", "bbox"]
    rows = table.to_pylist()
    first = corpus500.split("heldout")[0]
    assert rows[0]["label"] == f"{first['colour']} {first['shape']}"
    assert all(r["label"] is None for r in rows[60:])
    assert rows[0]["url"] == "http://127.0.0.1:9/images/heldout/000000.png"
    assert rows[0]["bbox"] == corpus500.split("heldout")[0]["bbox"]
    assert {r["url"].split(":9", 1)[1] for r in rows[60:]} == set(BROKEN_ENDPOINTS.values())
    write_url_table(corpus500, "http://h", str(path), split="train", include_broken=False)
    assert pq.read_table(path).num_rows == 500


def test_the_demo_section_saved_in_a_run_directory_is_found_from_its_checkpoints(tmp_path):
    from demo.config import DemoConfig, save_demo_config, saved_demo_config

    run = tmp_path / "runs" / "x"
    (run / "checkpoints" / "step_00000005").mkdir(parents=True)
    demo = DemoConfig(corpus=CorpusConfig(seed=4, num_train=9, num_heldout=3))
    save_demo_config(run, demo)
    assert saved_demo_config(run) == demo
    assert saved_demo_config(run / "checkpoints" / "step_00000005") == demo
    assert saved_demo_config(tmp_path / "elsewhere", run) == demo  # the first place holding one
    assert saved_demo_config(tmp_path / "elsewhere") == DemoConfig()  # none: the defaults
