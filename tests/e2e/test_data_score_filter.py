"""`vlm data score | filter | inspect` on ingested shards, with a CLIP checkpoint trained by
the real trainer (one step of the tiny model: the scores only need to be this model's)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.cli.main import main
from data_pipeline.config import FetchConfig, FilterConfig, IngestConfig
from demo.config import CorpusConfig
from data_pipeline.curate.filter import NearDuplicateIndex, balanced_sizes, select
from data_pipeline.ingest.shard import ingest_shard
from data_pipeline.shards.reader import ShardReader
from data_pipeline.shards.samples import iter_tar_samples, list_shards
from data_pipeline.curate.score import hamming
from demo.server import ImageServer
from demo.corpus import generate_corpus
from support.shardgen import TINY_MODEL, set_args, write_shards

REPO = Path(__file__).resolve().parents[2]
VLM = str(Path(sys.executable).parent / "vlm")
N_GOOD = 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two ingested shards: 24 corpus images, 3 near-duplicates (re-encoded, resized
    copies) and a 404 row; returns (shard dir, {near-dup key: original key})."""
    corpus = generate_corpus(CorpusConfig(num_train=N_GOOD, num_heldout=0, image_size=64),
                             tmp_path_factory.mktemp("corpus"))
    records = corpus.split("train")
    (corpus.root / "nd").mkdir()
    for i in range(3):
        img = Image.open(corpus.root / records[i]["path"]).convert("RGB").resize((60, 60))
        img.save(corpus.root / "nd" / f"{i}.jpg", quality=60)
    out = tmp_path_factory.mktemp("shards")
    cfg = IngestConfig(shard_size=16, threads=8, image_size=32,
                       fetch=FetchConfig(retries=0, allow_private_hosts=["127.0.0.1"]))
    with ImageServer(corpus.root) as srv:
        rows = [{"url": f"{srv.url}/{r['path']}", "caption": r["caption"]} for r in records]
        rows += [{"url": f"{srv.url}/nd/{i}.jpg", "caption": records[i]["caption"]} for i in range(3)]
        rows += [{"url": srv.broken_urls()["missing"], "caption": "gone"}]
        for sid in range(2):
            ingest_shard(rows[sid * 16:(sid + 1) * 16], sid, str(out), cfg)
    near = {"000010008": "000000000", "000010009": "000000001", "000010010": "000000002"}
    return out, near


@pytest.fixture(scope="module")
def ray_local():
    from cluster.ray.session import ray_session

    with ray_session(num_cpus=2, lean=True) as ray:
        yield ray


@pytest.fixture(scope="module")
def checkpoint(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    write_shards(root / "shards" / "train", n=32, per_shard=32)
    # joins the test's Ray rather than starting one more
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.run([VLM, "train", "--config", "configs/demo.yaml", "--set", f"run_dir={root}",
                           "--ray-address", address,
                           "--set", "train.steps=1", "--set", "train.checkpoint_every=1000",
                           "--set", "train.num_workers=1", "--set", "train.micro_batch_size=8",
                           "--set", "metrics.port=0", *set_args(*TINY_MODEL)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return root


def test_near_duplicate_index_matches_brute_force():
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(0, 2**63, size=300)]
    values += [v ^ (1 << int(b)) ^ (1 << int(c)) for v, b, c in zip(values[:50], rng.integers(0, 64, 50),
                                                                    rng.integers(0, 64, 50))]
    index, kept = NearDuplicateIndex(64, 3), []
    for i, v in enumerate(values):
        brute = next((key for w, key in kept if (v ^ w).bit_count() <= 3), None)
        found = index.find(v)
        assert (found is None) == (brute is None)
        if found is None:
            index.add(v, str(i))
            kept.append((v, str(i)))
    assert 290 <= len(kept) <= 300  # the 50 flipped copies were found


def test_rules_and_balanced_sizes():
    import pyarrow as pa

    scores = pa.Table.from_pylist([
        {"key": "a", "shard": "00000.tar", "clip_score": 0.9, "phash": "ffff000000000000"},
        {"key": "b", "shard": "00000.tar", "clip_score": 0.95, "phash": "ffff000000000001"},  # near a
        {"key": "c", "shard": "00000.tar", "clip_score": 0.1, "phash": "0000ffff00000000"},
        {"key": "d", "shard": "00000.tar", "clip_score": 0.5, "phash": "00000000ffff0000"},
        {"key": "e", "shard": "00000.tar", "clip_score": 0.4, "phash": "000000000000ffff"},
    ])
    rows = {r["key"]: r for r in select(scores, FilterConfig(min_clip_score=0.2, top_fraction=0.5))}
    assert rows["c"]["reason"] == "low_clip_score"
    assert (rows["a"]["reason"], rows["a"]["detail"]) == ("near_duplicate", "of b")
    assert [k for k, r in rows.items() if r["kept"]] == ["b", "d"]  # top half of b, d, e
    assert rows["e"]["reason"] == "below_top_fraction"
    assert balanced_sizes(23, 10) == [8, 8, 7] and balanced_sizes(0, 10) == [] and balanced_sizes(10, 10) == [10]
    with pytest.raises(ValueError, match="CLIP scores"):
        select(scores.set_column(2, "clip_score", pa.array([None] * 5, pa.float32())), FilterConfig(top_fraction=0.5))


def test_score_filter_inspect(ray_local, shards, checkpoint, tmp_path, capsys):
    shard_dir, near = shards
    assert main(["data", "score", str(shard_dir), "--checkpoint", str(checkpoint), "--batch-size", "8",
                 "--actors", "2", "--no-progress"]) == 0
    assert "2 scored" in capsys.readouterr().out
    scores = {r["key"]: r for p in sorted(shard_dir.glob("*_scores.parquet")) for r in pq.read_table(p).to_pylist()}
    samples = {s["__key__"]: s for tar in list_shards(str(shard_dir)) for s in iter_tar_samples(tar)}
    assert scores.keys() == samples.keys() and len(scores) == N_GOOD + 3
    for copy, original in near.items():
        assert hamming(scores[copy]["phash"], scores[original]["phash"]) <= 4
    assert min(hamming(scores[a]["phash"], scores[b]["phash"]) for a in list(scores)[:N_GOOD]
               for b in list(scores)[:N_GOOD] if a < b) > 4

    # the CLIP score is the checkpoint's own cosine of image and caption embeddings
    import torch

    from vlm.data.batches import decode_image
    from vlm.eval.load import load_eval_model

    model, text, cfg = load_eval_model(str(checkpoint))
    keys = sorted(samples)[:5]
    with torch.no_grad():
        img = model.encode_image(torch.stack([decode_image(samples[k], cfg.model.vision.image_size) for k in keys]))
        txt = model.encode_text(*text([samples[k]["txt"] for k in keys]))
    expected = (img * txt).sum(-1).tolist()
    assert [scores[k]["clip_score"] for k in keys] == pytest.approx(expected, abs=1e-4)

    assert main(["data", "score", str(shard_dir), "--no-progress"]) == 0  # scored already: skipped
    assert "2 skipped" in capsys.readouterr().out

    values = sorted(r["clip_score"] for r in scores.values())
    threshold = values[3]  # drops exactly three samples (unless they are also near-duplicates)
    out = tmp_path / "filtered"
    assert main(["data", "filter", str(shard_dir), "--output", str(out), "--min-clip-score", str(threshold),
                 "--near-dup-distance", "4", "--shard-size", "7", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    manifest = {r["key"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    summary = json.loads((out / "manifest.json").read_text())
    assert manifest.keys() == scores.keys()
    for key, r in manifest.items():
        assert r["kept"] == (r["reason"] is None)
        if scores[key]["clip_score"] < threshold:
            assert r["reason"] == "low_clip_score"
    for copy, original in near.items():  # of each near-duplicate pair that passed the threshold, one stays
        pair = [manifest[copy], manifest[original]]
        if all(p["reason"] != "low_clip_score" for p in pair):
            assert sorted(p["kept"] for p in pair) == [False, True]
            assert next(p for p in pair if not p["kept"])["reason"] == "near_duplicate"
    kept = sorted(k for k, r in manifest.items() if r["kept"])
    assert summary["kept"] == len(kept) and f"kept {len(kept)} of {N_GOOD + 3}" in printed
    sizes = summary["shard_sizes"]
    assert sum(sizes) == len(kept) and max(sizes) - min(sizes) <= 1 and max(sizes) <= 7
    # OpenCLIP's loader sums sizes.json over the basenames of the tars it is given
    assert json.loads((out / "sizes.json").read_text()) == {f"{i:05d}.tar": n for i, n in enumerate(sizes)}

    import webdataset as wds

    tars = [str(p) for p in sorted(out.glob("*.tar"))]
    got = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in got) == kept
    assert all("clip_score" in s["json"] and s["jpg"].size == (32, 32) for s in got)
    reader = iter(ShardReader(list_shards(str(out)), shuffle_block=3))
    assert sorted(next(reader)["__key__"] for _ in kept) == kept
    assert main(["data", "filter", str(shard_dir), "--output", str(out), "--no-progress"]) == 1  # not over a set

    sheet = tmp_path / "sheet.png"
    report = tmp_path / "summary.json"
    assert main(["data", "inspect", str(shard_dir), "--contact-sheet", str(sheet), "--images", "12",
                 "--json", str(report)]) == 0
    text_out = capsys.readouterr().out
    assert f"{N_GOOD + 4} total, {N_GOOD + 3} ok, 1 failed" in text_out and "http_404" in text_out
    info = json.loads(report.read_text())
    assert info["failures_by_reason"] == {"http_404": 1}
    assert (info["original_width"]["0-63"], info["original_width"]["64-127"]) == (3, N_GOOD)  # copies: 60 px
    assert info["scored"] == N_GOOD + 3 and "clip_score_quantiles" in info
    png = Image.open(io.BytesIO(sheet.read_bytes()))
    assert png.format == "PNG" and png.size == (6 * 136, 2 * (128 + 36 + 8))
    assert np.asarray(png.convert("L")).std() > 10  # images were drawn, not a blank page
    assert main(["data", "inspect", str(out)]) == 0
    assert f"{len(kept)} total, {len(kept)} ok, 0 failed" in capsys.readouterr().out
