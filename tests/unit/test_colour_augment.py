"""Caption-consistent greyscale augmentation (data.colour_augment): the image loses its
colours and the caption's, label's and region phrases' colour words are renamed to match;
the batch loader draws it reproducibly; the demo's recipe never shows a held-out
(colour, shape) combination."""
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from pydantic import ValidationError

from data_pipeline.shards.reader import ShardReader
from data_pipeline.shards.samples import list_shards
from demo.corpus import COLOURS, render_image, word_synonyms
from vlm.data.augment import colour_augment, rename_colours
from vlm.config import load_config
from vlm.data.config import COLOUR_WORDS, ColourAugmentConfig
from vlm.data.batches import BatchLoader, decode_image, image_id, label_id
from vlm.data.tokenizer import TextEncoder, train_tokenizer

WORDS = COLOUR_WORDS


@pytest.mark.parametrize("text, new, expected", [
    ("An orange disc.", "grey", "A grey disc."),
    ("a photo of a red star.", "orange", "a photo of an orange star."),
    ("Crimson block on a black background.", "cyan", "Cyan block on a black background."),
    ("a small amber dot, a BLUE box", "grey", "a small grey dot, a Grey box"),
    ("bred reddish red-ish", "pink", "bred reddish pink-ish"),  # whole words only
    ("a white cat on black snow", "grey", "a white cat on black snow"),  # achromatic words stay
    ("no colour here", "grey", "no colour here"),
])
def test_rename_colours(text, new, expected):
    assert rename_colours(text, WORDS, new) == expected


def _png(rgb_array):
    buf = io.BytesIO()
    Image.fromarray(rgb_array).save(buf, format="PNG")
    return buf.getvalue()


def _sample(colour="red", shape="square", caption="A crimson square on a dark background."):
    pixels, _, _ = render_image(np.random.default_rng(1), colour, shape, 32)
    meta = {"label": f"{colour} {shape}", "sha256": "ab" * 32,
            "regions": [{"box": [0, 0, 1, 1], "phrase": f"{colour} {shape}"}]}
    return {"__key__": "k", "png": _png(pixels), "txt": caption, "json": meta}


def test_greyscale_renames_every_colour_word_and_makes_the_image_grey():
    cfg = ColourAugmentConfig(greyscale=0.5)
    sample = _sample()
    out, transform = colour_augment(sample, cfg, draw=0.2, label_field="label")
    assert out["txt"] == "A grey square on a dark background."
    assert out["json"]["label"] == "grey square" and out["json"]["regions"][0]["phrase"] == "grey square"
    assert image_id(out) != image_id(sample)  # another picture: another image id
    assert sample["txt"].startswith("A crimson") and sample["json"]["label"] == "red square"  # input untouched
    image = decode_image(out, 32, transform, mean=(0.5,) * 3, std=(0.5,) * 3)  # equal channels stay equal
    assert (image[0] - image[1]).abs().max() < 0.01 and (image[1] - image[2]).abs().max() < 0.01
    bare = dict(sample, json={})  # no sha256 in the metadata: the grey image still gets its own id
    assert image_id(colour_augment(bare, cfg, draw=0.2)[0]) != image_id(bare)
    kept, none = colour_augment(sample, cfg, draw=0.7, label_field="label")
    assert kept is sample and none is None  # above the greyscale share: unchanged


@pytest.mark.parametrize("kwargs, message", [
    ({"greyscale": 1.5}, "less than or equal to 1"),
    ({"greyscale": -0.1}, "greater than or equal to 0"),
    ({"grey_word": "Grey!"}, "grey_word"),
    ({"colour_words": ["red", "Blue"]}, "'Blue' is not a lower-case word"),
    ({"colour_words": ["red", "grey"]}, "grey_word 'grey' is one of colour_words"),
])
def test_bad_settings_are_refused_with_what_is_wrong(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        ColourAugmentConfig(**kwargs)


def test_a_typo_in_the_run_config_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="greyscal"):
        load_config("configs/coca.yaml", ["data.colour_augment.greyscal=0.3"])


def _write_shard(path, n=24):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = list(COLOURS)
    with wds.TarWriter(str(path / "00000.tar")) as w:
        for i in range(n):
            colour = colours[i % len(colours)]
            pixels, bbox, _ = render_image(rng, colour, "circle", 32)
            meta = {"label": f"{colour} circle", "sha256": f"{i:064d}",
                    "regions": [{"box": [0, 0, 1, 1], "phrase": f"{colour} circle"}]}
            w.write({"__key__": f"{i:05d}", "png": _png(pixels), "txt": f"a {colour} circle .", "json": meta})
    (path / "00000_stats.json").write_text(json.dumps({"success": n}))


def test_the_batch_loader_augments_a_share_reproducibly(tmp_path):
    _write_shard(tmp_path / "s")
    words = [f"a {c} circle ." for c in (*COLOURS, "grey")] * 5
    text = TextEncoder(train_tokenizer(words, vocab_size=120), 12)
    cfg = ColourAugmentConfig(greyscale=0.5)

    def loader(colour):
        reader = ShardReader(list_shards(str(tmp_path / "s")), rank=0, world_size=1, seed=0, shuffle_block=1)
        return BatchLoader(reader, text, batch_size=24, image_size=32, label_field="label",
                           needs=frozenset({"regions", "image_ids"}), colour=colour)

    plain, a, b = loader(None).next_batch(), loader(cfg).next_batch(), loader(cfg).next_batch()
    for key in a:
        assert (a[key] == b[key]).all(), key  # the same seed and batch number draw the same
    changed = (a["tokens"] != plain["tokens"]).any(dim=1)
    assert 4 <= changed.sum() <= 20  # ~half of the 24 drawn
    captions = [text.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in a["tokens"]]
    is_grey = torch.tensor(["grey" in c.split() for c in captions])
    assert (is_grey == changed).all()
    for i in range(24):
        img = a["images"][i].permute(2, 0, 1).int()  # uint8 [S, S, 3] -> [3, S, S]
        if is_grey[i]:
            assert (img[0] == img[1]).all()
            assert a["labels"][i] != plain["labels"][i] and a["phrase_ids"][i, 0] == a["labels"][i]
        if changed[i]:
            assert a["image_ids"][i] != plain["image_ids"][i]
            assert (img - plain["images"][i].permute(2, 0, 1).int()).abs().max() > 2  # the pixels changed too
        else:
            assert (img == plain["images"][i].permute(2, 0, 1)).all() and a["labels"][i] == plain["labels"][i]
    assert a["labels"][is_grey].unique().tolist() == [label_id("grey circle")]
    off = loader(ColourAugmentConfig()).next_batch()  # shares of 0: the loader does nothing
    assert all((off[k] == plain[k]).all() for k in plain)


def test_the_demo_recipe_never_shows_a_held_out_colour():
    """The coca recipe renames every colour word the corpus uses, and to a word that is none
    of the corpus's colours: a grey image is never called red (no held-out pair is made)."""
    cfg = load_config("configs/coca.yaml").data.colour_augment
    assert cfg.enabled
    corpus_words = {w for c in COLOURS for w in word_synonyms()[c]}
    assert corpus_words <= set(cfg.colour_words)
    assert cfg.grey_word not in corpus_words and cfg.grey_word not in word_synonyms()


def test_the_tokenizer_learns_the_words_the_augmentation_writes(tmp_path):
    from vlm.data.tokenizer import ensure_tokenizer

    _write_shard(tmp_path / "s")
    for extra, name in (((), "plain.json"), (("cyan", "grey"), "extra.json")):
        ensure_tokenizer(str(tmp_path / "s"), tmp_path / name, vocab_size=300, min_frequency=2, extra_words=extra)
    plain = TextEncoder.from_json((tmp_path / "plain.json").read_text(), 12).tokenizer
    extra = TextEncoder.from_json((tmp_path / "extra.json").read_text(), 12).tokenizer
    for word in ("cyan", "grey"):
        assert len(plain.encode(f"a {word}", add_special_tokens=False).ids) > 2  # split into pieces
        assert len(extra.encode(f"a {word}", add_special_tokens=False).ids) == 2  # one token
