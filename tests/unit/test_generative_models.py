"""The fusion and decoding modules (fusion encoders, CoCa decoder, MAE decoder, RoI-align,
the masked paths of the towers), caption decoding, and the new data fields (regions in
the demo corpus, BatchLoader's `needs`)."""
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.shards.reader import ShardReader
from data_pipeline.shards.samples import list_shards
from demo.corpus import generate_corpus
from demo.tables import write_url_table
from demo.config import CorpusConfig
from vlm.data.batches import NO_LABEL, BatchLoader, label_id
from vlm.eval.generate import beam_search, caption, greedy
from vlm.models.config import ModelConfig
from vlm.models.decoder import MAEDecoder
from vlm.models.fusion import FusionEncoder
from vlm.models.registry import build_model
from vlm.models.roi import roi_align
from vlm.data.tokenizer import TextEncoder, train_tokenizer

torch.set_num_threads(1)


def small_model(**extra):
    cfg = {"embed_dim": 16, "vision": {"image_size": 16, "patch_size": 4, "width": 32, "depth": 1, "heads": 2},
           "text": {"context_length": 12, "width": 32, "depth": 1, "heads": 2}, **extra}
    return build_model(ModelConfig(**cfg), vocab_size=100)


@pytest.mark.parametrize("kind", ["concat", "cross"])
def test_fusion_encoder_hides_padding_and_reads_both_modalities(kind):
    torch.manual_seed(0)
    fusion = FusionEncoder(type=kind, image_width=24, text_width=20, width=32, depth=2, heads=4).eval()
    image, text, eot = torch.randn(2, 5, 24), torch.randn(2, 7, 20), torch.tensor([3, 6])
    out = fusion(image, text, eot)
    assert out["cls"].shape == (2, 32) and out["image"].shape == (2, 5, 32) and out["text"].shape == (2, 7, 32)
    padded = text.clone()
    padded[0, 4:] = 100.0  # after <eot> of row 0
    again = fusion(image, padded, eot)
    assert torch.allclose(again["cls"], out["cls"], atol=1e-5)
    assert torch.allclose(again["text"][:, :4], out["text"][:, :4], atol=1e-5)
    other_image = fusion(torch.randn(2, 5, 24), text, eot)
    assert not torch.allclose(other_image["cls"], out["cls"], atol=1e-3)
    with pytest.raises(ValueError, match="fusion type"):
        FusionEncoder(type="sum", image_width=4, text_width=4, width=8, depth=1, heads=2)


def test_caption_decoder_is_causal_and_sees_the_image():
    torch.manual_seed(0)
    model = small_model(decoder={"depth": 2, "heads": 2}).eval()
    images, tokens, eot = torch.randn(2, 3, 16, 16), torch.randint(3, 100, (2, 12)), torch.tensor([11, 11])
    out = model(images, tokens, eot)
    logits = model.decoder(out["text_tokens"], out["image_tokens"])
    assert logits.shape == (2, 12, 100)
    changed = tokens.clone()
    changed[:, 6] = 3 if tokens[0, 6] != 3 else 4
    out2 = model(images, changed, eot)
    logits2 = model.decoder(out2["text_tokens"], out2["image_tokens"])
    assert torch.allclose(logits[:, :6], logits2[:, :6], atol=1e-5)
    assert not torch.allclose(logits[:, 6:], logits2[:, 6:], atol=1e-5)
    out3 = model(torch.randn(2, 3, 16, 16), tokens, eot)
    assert not torch.allclose(model.decoder(out3["text_tokens"], out3["image_tokens"]), logits, atol=1e-5)


def test_mae_decoder_puts_visible_tokens_back_in_place():
    torch.manual_seed(0)
    dec = MAEDecoder(num_patches=6, encoder_width=8, width=16, depth=1, heads=2, patch_dim=5).eval()
    keep = torch.tensor([[0, 4], [2, 5]])
    visible = torch.randn(2, 2, 8)
    pred = dec(visible, keep)
    assert pred.shape == (2, 6, 5)
    # swapping which position a token sits at changes the prediction; permuting the pairs does not
    same = dec(visible.flip(1), keep.flip(1))
    assert torch.allclose(same, pred, atol=1e-5)
    assert not torch.allclose(dec(visible.flip(1), keep), pred, atol=1e-4)


def naive_roi_align(feat, box, out, ratio):
    """torchvision's aligned RoI-align, one box, float64 loops: bilinear samples clamped to the map."""
    c, h, w = feat.shape
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    bw, bh = (x1 - x0) / out, (y1 - y0) / out
    res = torch.zeros(c, out, out, dtype=torch.float64)

    def bilinear(y, x):
        y, x = min(max(y, 0.0), h - 1), min(max(x, 0.0), w - 1)
        ya, xa = int(np.floor(y)), int(np.floor(x))
        yb, xb = min(ya + 1, h - 1), min(xa + 1, w - 1)
        ly, lx = y - ya, x - xa
        return ((1 - ly) * (1 - lx) * feat[:, ya, xa] + (1 - ly) * lx * feat[:, ya, xb]
                + ly * (1 - lx) * feat[:, yb, xa] + ly * lx * feat[:, yb, xb])

    for i in range(out):
        for j in range(out):
            acc = 0
            for a in range(ratio):
                for b in range(ratio):
                    y = y0 + (i + (a + 0.5) / ratio) * bh - 0.5  # pixel k's centre is at k + 0.5
                    x = x0 + (j + (b + 0.5) / ratio) * bw - 0.5
                    acc = acc + bilinear(float(y), float(x))
            res[:, i, j] = acc / ratio ** 2
    return res


def test_roi_align_matches_naive_bilinear_sampling():
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 5, 6)
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0], [0.5, 0.05, 0.55, 0.3]])
    index = torch.tensor([0, 1, 1])
    got = roi_align(feats, boxes, index, output_size=2, sampling_ratio=3)
    assert got.shape == (3, 3, 2, 2)
    for n in range(3):
        ref = naive_roi_align(feats[index[n]].double(), boxes[n].double(), 2, 3)
        assert torch.allclose(got[n].double(), ref, atol=1e-5), n
    with pytest.raises(ValueError, match="boxes"):
        roi_align(feats, boxes[:, :3], index)


def test_vit_patch_mask_and_text_mask_paths():
    torch.manual_seed(0)
    model = small_model().eval()
    images = torch.randn(1, 3, 16, 16)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True
    embed = torch.randn(32)
    a = model.visual(images, patch_mask=mask, mask_embed=embed)["tokens"]
    changed = images.clone()
    changed[:, :, 4:8, 4:8] += 5.0  # patch 5 (row 1, column 1) only
    b = model.visual(changed, patch_mask=mask, mask_embed=embed)["tokens"]
    assert torch.allclose(a, b, atol=1e-5)  # a masked patch's pixels are not seen
    assert not torch.allclose(model.visual(changed)["tokens"], model.visual(images)["tokens"])
    tokens, eot = torch.randint(3, 100, (1, 12)), torch.tensor([8])
    masked = torch.zeros(1, 12, dtype=torch.bool)
    masked[0, 3] = True
    other = tokens.clone()
    other[0, 3] = 3 if tokens[0, 3] != 3 else 4
    other[0, 10] = 5  # padding after <eot>: hidden from a causal tower run bidirectionally
    mask_embed = torch.randn(32)
    t1 = model.text(tokens, eot, causal=False, masked=masked, mask_embed=mask_embed)["tokens"]
    t2 = model.text(other, eot, causal=False, masked=masked, mask_embed=mask_embed)["tokens"]
    assert torch.allclose(t1[:, :9], t2[:, :9], atol=1e-5)
    with pytest.raises(ValueError, match="mask_embed"):
        model.visual(images, patch_mask=mask)


@pytest.fixture(scope="module")
def tokenizer():
    words = [f"a {c} {s} ." for c in ("red", "blue", "green") for s in ("circle", "square")] * 10
    return TextEncoder(train_tokenizer(words, vocab_size=120), 12)


def test_greedy_and_beam_decoding(tokenizer):
    torch.manual_seed(0)
    cfg = {"embed_dim": 16, "vision": {"image_size": 16, "patch_size": 4, "width": 32, "depth": 1, "heads": 2},
           "text": {"context_length": 12, "width": 32, "depth": 1, "heads": 2}, "decoder": {"depth": 1, "heads": 2}}
    model = build_model(ModelConfig(**cfg), vocab_size=tokenizer.vocab_size).eval()
    with torch.no_grad():
        model.decoder.head.weight.normal_(std=1.0)  # a peaked distribution, so decoding choices differ
    images = torch.randn(3, 3, 16, 16)
    ids = greedy(model, images, tokenizer)
    # greedy = argmax of a full re-run of the model on each prefix
    for row, img in zip(ids, images):
        seq = [tokenizer.sot_id]
        for _ in range(11):
            out = model(img[None], torch.tensor([seq]), torch.tensor([len(seq) - 1]))
            logits = model.decoder(out["text_tokens"], out["image_tokens"])[0, -1]
            logits[[tokenizer.pad_id, tokenizer.sot_id]] = float("-inf")
            seq.append(int(logits.argmax()))
            if seq[-1] == tokenizer.eot_id:
                break
        assert row == [t for t in seq[1:] if t != tokenizer.eot_id]
    assert beam_search(model, images, tokenizer, beam=1, length_penalty=0.0) == ids
    wide = beam_search(model, images, tokenizer, beam=4)
    assert len(wide) == 3 and all(tokenizer.eot_id not in r and tokenizer.pad_id not in r for r in wide)
    assert all(isinstance(c, str) for c in caption(model, images, tokenizer, beam=2))
    with pytest.raises(ValueError, match="caption decoder"):
        greedy(small_model(), images, tokenizer)


def test_corpus_records_a_box_and_a_phrase_per_shape(tmp_path):
    corpus = generate_corpus(CorpusConfig(num_train=20, num_heldout=4, image_size=64), tmp_path / "c")
    for r in corpus.records:
        (region,) = r["regions"]
        assert region["phrase"] == f"{r['colour']} {r['shape']}"
        x0, y0, x1, y1 = r["bbox"]
        assert region["box"] == [x0 / 64, y0 / 64, (x1 + 1) / 64, (y1 + 1) / 64]
    import pyarrow.parquet as pq

    write_url_table(corpus, "http://127.0.0.1:1", str(tmp_path / "t.parquet"), split="train", regions=True,
                    include_broken=False)
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert rows[0]["regions"] == corpus.split("train")[0]["regions"]
    write_url_table(corpus, "http://127.0.0.1:1", str(tmp_path / "u.parquet"), split="train", include_broken=False)
    assert "regions" not in pq.read_table(tmp_path / "u.parquet").column_names  # unchanged by default


def write_region_shard(path, samples):
    path.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path / "00000.tar")) as w:
        for i, (meta, rgb) in enumerate(samples):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), rgb).save(buf, format="PNG")
            w.write({"__key__": f"{i:05d}", "png": buf.getvalue(), "txt": "a red circle .", "json": meta})
    (path / "00000_stats.json").write_text(json.dumps({"success": len(samples)}))


def test_batch_loader_adds_fields_only_when_needed(tmp_path, tokenizer):
    regions = [{"box": [0.1, 0.2, 0.5, 0.6], "phrase": "red circle"}, {"box": [0.5, 0.5, 1.0, 1.0], "phrase": "blue square"}]
    write_region_shard(tmp_path / "s", [({"regions": regions}, (255, 0, 0)), ({"regions": regions[:1]}, (255, 0, 0)),
                                        ({"regions": []}, (0, 0, 255))])

    def loader(needs):
        reader = ShardReader(list_shards(str(tmp_path / "s")), rank=0, world_size=1, seed=0, shuffle_block=1)
        return BatchLoader(reader, tokenizer, batch_size=3, image_size=16, needs=needs)

    assert set(loader(frozenset()).next_batch()) == {"images", "tokens", "eot_index"}
    batch = loader(frozenset({"regions", "image_ids", "image_embed"})).next_batch()
    assert batch["boxes"].shape == (3, 2, 4) and batch["phrase_tokens"].shape == (3, 2, 12)
    assert batch["box_valid"].sum() == 3
    ids = batch["image_ids"]
    assert len(set(ids.tolist())) == 2  # samples 0 and 1 are the same picture
    row = next(i for i in range(3) if batch["box_valid"][i].sum() == 2)
    assert torch.allclose(batch["boxes"][row, 0], torch.tensor([0.1, 0.2, 0.5, 0.6]))
    assert batch["phrase_ids"][row].tolist() == [label_id("red circle"), label_id("blue square")]
    empty = next(i for i in range(3) if batch["box_valid"][i].sum() == 0)
    assert batch["phrase_ids"][empty].tolist() == [NO_LABEL, NO_LABEL]
    write_region_shard(tmp_path / "s", [({"colour": "red"}, (255, 0, 0))] * 3)
    with pytest.raises(ValueError, match="no 'regions' metadata"):
        loader(frozenset({"regions"})).next_batch()
