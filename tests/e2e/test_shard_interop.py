"""Shards across tools (issue 23): `vlm train` trains from a folder laid out exactly as
img2dataset writes it, and OpenCLIP's webdataset pipeline reads what `vlm data ingest`
writes, sizing the epoch from `sizes.json` so that no `--train-num-samples` is needed.

OpenCLIP's `open_clip_train/data.py` is not imported (it imports torchvision, which must not
enter this environment): its `--dataset-type webdataset` reading is rebuilt here from
webdataset's own stages, in the order that file chains them."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from demo.config import CorpusConfig
from demo.corpus import generate_corpus, make_caption, render_image, train_pairs
from demo.server import ImageServer
from support.shardgen import TINY_MODEL, set_args
from vlm.checkpoint.safeload import load_trainer_state

pytestmark = pytest.mark.e2e
VLM = str(Path(sys.executable).parent / "vlm")
REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------ img2dataset's layout, by hand

# The parquet schema img2dataset 1.47 writes with url and caption columns, exif extraction
# and the sha256 hash (its defaults): the input columns, then its own, in this order (its
# per-sample json has the same keys in the same order).
IMG2DATASET_SCHEMA = pa.schema([
    ("caption", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("exif", pa.string()),
    ("sha256", pa.string()),
])
STORED, ORIGINAL = 64, (96, 80)  # img2dataset's image_size; the size each "download" had
FAILURES = (("failed_to_download", "HTTP Error 404: Not Found"),
            ("failed_to_resize", "Image decoding error"))


def _row(shard: int, i: int, caption: str) -> dict:
    key = f"{shard:05d}{i:04d}"  # img2dataset's key with its default 10,000 samples per shard
    return {"caption": caption, "url": f"http://images.example.invalid/{key}.png", "key": key, "status": None,
            "error_message": None, "width": None, "height": None, "original_width": None,
            "original_height": None, "exif": None, "sha256": None}


def _download_and_resize(rng: np.random.Generator) -> tuple[bytes, bytes, str]:
    """A coloured shape "downloaded" as a PNG of ORIGINAL size and stored as img2dataset's
    border resize does: scaled to fit STORED, padded black, JPEG -> (original, stored, caption)."""
    pairs = train_pairs()
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    pixels, bbox, tone = render_image(rng, colour, shape, ORIGINAL[0])
    caption, _ = make_caption(rng, colour, shape, bbox, ORIGINAL[0], tone)
    original = Image.fromarray(pixels).resize(ORIGINAL)
    raw = io.BytesIO()
    original.save(raw, "PNG")
    scale = STORED / max(ORIGINAL)
    fitted = original.resize((round(ORIGINAL[0] * scale), round(ORIGINAL[1] * scale)), Image.BICUBIC)
    canvas = Image.new("RGB", (STORED, STORED))
    canvas.paste(fitted, ((STORED - fitted.width) // 2, (STORED - fitted.height) // 2))
    stored = io.BytesIO()
    canvas.save(stored, "JPEG", quality=95)
    return raw.getvalue(), stored.getvalue(), caption


def write_img2dataset_shard(out: Path, shard: int, *, rows: int, failed: int, rng: np.random.Generator) -> int:
    """Shard `shard` as img2dataset writes it with output_format=webdataset:
    {shard:05d}.tar ({key}.jpg, .json, .txt per success, through webdataset's TarWriter),
    {shard:05d}.parquet (one row per input row) and {shard:05d}_stats.json. The last
    `failed` rows fail (a 404, then an undecodable body, in turn). Returns its successes."""
    start, table, status_dict = time.time(), [], {}
    with wds.TarWriter(str(out / f"{shard:05d}.tar")) as tar:
        for i in range(rows):
            original, stored, caption = _download_and_resize(rng)
            meta = _row(shard, i, caption)
            if i >= rows - failed:
                meta["status"], meta["error_message"] = FAILURES[(i - rows + failed) % len(FAILURES)]
            else:
                meta.update(status="success", width=STORED, height=STORED, original_width=ORIGINAL[0],
                            original_height=ORIGINAL[1], exif="{}", sha256=hashlib.sha256(original).hexdigest())
                tar.write({"__key__": meta["key"], "jpg": stored, "txt": caption, "json": json.dumps(meta, indent=4)})
            table.append(meta)
            reason = meta["error_message"] or "success"
            status_dict[reason] = status_dict.get(reason, 0) + 1
    pq.write_table(pa.Table.from_pylist(table, schema=IMG2DATASET_SCHEMA), out / f"{shard:05d}.parquet")
    end = time.time()
    counts = {s: sum(r["status"] == s for r in table) for s in ("success", "failed_to_download", "failed_to_resize")}
    stats = {"count": rows, "successes": counts["success"], "failed_to_download": counts["failed_to_download"],
             "failed_to_resize": counts["failed_to_resize"], "duration": end - start, "start_time": start,
             "end_time": end, "status_dict": status_dict}
    (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    return counts["success"]


# ------------------------------------------------------------- vlm train on img2dataset's shards

SHARDS, ROWS, FAILED = 2, 24, 4  # 20 successes per shard, 40 in all
BATCH, STEPS = 8, 7  # 56 samples: one whole epoch, then 16 of the next


def _samples_read(reader: dict, successes: int) -> int:
    """Samples a reader slot has emitted: its whole epochs, its finished shards of this
    epoch and its position in the current one (every shard holds `successes` samples)."""
    per_epoch = reader["num_shards"] // (reader["world_size"] * reader["num_workers"])
    return (reader["epoch"] * per_epoch + reader["shard_cursor"]) * successes + reader["sample_cursor"]


def test_train_from_img2dataset_layout_shards(tmp_path):
    shards = tmp_path / "img2dataset_out"
    shards.mkdir()
    rng = np.random.default_rng(0)
    successes = [write_img2dataset_shard(shards, s, rows=ROWS, failed=FAILED, rng=rng) for s in range(SHARDS)]
    assert successes == [ROWS - FAILED] * SHARDS
    run_dir = tmp_path / "run"
    overrides = [*TINY_MODEL, "tokenizer.kind=clip", "model.text.context_length=77",
                 "train.num_workers=1", f"train.micro_batch_size={BATCH}", f"train.steps={STEPS}",
                 "train.log_every=1", "train.checkpoint_every=1000", "metrics.port=0", "name=img2dataset",
                 f"run_dir={run_dir}", f"data.train_shards={shards}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.run([VLM, "train", "--config", "configs/demo.yaml", *set_args(*overrides)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "wrote CLIP's tokenizer" in proc.stdout

    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["samples"] for r in log] == [BATCH * s for s in range(1, STEPS + 1)]
    assert all(math.isfinite(r["loss/total"]) and r["loss/total"] > 0 for r in log)
    assert log[-1]["bad_samples"] == 0
    # the readers' positions in the final checkpoint: every success of both shards read
    # once (one epoch of 40), then the next epoch's first 16, and nothing else
    state = load_trainer_state(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    assert state["samples_seen"] == STEPS * BATCH
    readers = [w for r in state["ranks"] for w in r["reader"]["workers"]]
    assert {r["num_shards"] for r in readers} == {SHARDS}
    assert sum(_samples_read(r, ROWS - FAILED) for r in readers) == STEPS * BATCH
    assert min(r["epoch"] for r in readers) == 1  # past sum(successes) == 40


# ------------------------------------------------- OpenCLIP's webdataset reading of our shards


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The loopback image server of the ingest tests over 20 corpus images -> (server, corpus)."""
    corpus = generate_corpus(CorpusConfig(num_train=20, num_heldout=0, image_size=48),
                             tmp_path_factory.mktemp("corpus"))
    with ImageServer(corpus.root) as srv:
        yield srv, corpus


def _url_table(server, corpus, path: Path) -> list[dict]:
    """20 good rows with the corpus's captions, and three rows that end without a sample:
    a 404, an HTML body and a blank caption, spread over the shards."""
    rows = [{"url": f"{server.url}/{r['path']}", "caption": r["caption"]} for r in corpus.split("train")]
    broken = server.broken_urls()
    rows.insert(3, {"url": broken["missing"], "caption": "a red circle that is not there"})
    rows.insert(11, {"url": broken["not_an_image"], "caption": "a blue square that is a web page"})
    rows.insert(19, {"url": f"{server.url}/{corpus.split('train')[0]['path']}", "caption": "   "})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def openclip_dataset_size(train_data: str) -> tuple[int, int]:
    """As OpenCLIP's get_dataset_size: the brace-expanded shard list, each shard's count
    from sizes.json beside the first one -> (samples, shards)."""
    shards = wds.shardlists.expand_urls(train_data)
    sizes = json.loads((Path(shards[0]).parent / "sizes.json").read_text())
    return sum(int(sizes[os.path.basename(s)]) for s in shards), len(shards)


def _has_caption_and_image(sample: dict) -> bool:
    """OpenCLIP's filter_no_caption_or_no_image."""
    return "txt" in sample and any(ext in sample for ext in ("png", "jpg", "jpeg", "webp"))


def openclip_pipeline(train_data: str, errors: list[str]) -> wds.DataPipeline:
    """OpenCLIP's webdataset stages, less its shuffling, splitting, preprocessing and
    batching. Where OpenCLIP logs an error and goes on, this records it for the test."""
    def keep_going(exn: Exception) -> bool:
        errors.append(repr(exn))
        return True

    return wds.DataPipeline(
        wds.SimpleShardList(train_data),
        wds.tarfile_to_samples(handler=keep_going),
        wds.select(_has_caption_and_image),
        wds.decode("pilrgb", handler=keep_going),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.to_tuple("image", "text"),
    )


def test_openclip_webdataset_reads_ingested_shards(served, tmp_path):
    srv, corpus = served
    rows = _url_table(srv, corpus, tmp_path / "urls.parquet")
    out = tmp_path / "shards"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([VLM, "data", "ingest", "--input", str(tmp_path / "urls.parquet"), "--output", str(out),
                           "--no-progress", "--metrics-port", "-1", "--processes", "2",
                           *set_args("data.ingest.shard_size=8", "data.ingest.threads=4", "data.ingest.image_size=32",
                                     "data.ingest.fetch.retries=0", "data.ingest.fetch.allow_private_hosts=[127.0.0.1]")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    stats = {p.name.replace("_stats.json", ".tar"): json.loads(p.read_text()) for p in out.glob("*_stats.json")}
    assert len(stats) == 3 and sum(s["count"] for s in stats.values()) == len(rows)
    assert json.loads((out / "sizes.json").read_text()) == {tar: s["successes"] for tar, s in stats.items()}
    status = [r for p in sorted(out.glob("[0-9][0-9][0-9][0-9][0-9].parquet")) for r in pq.read_table(p).to_pylist()]
    ok = [r for r in status if r["status"] == "success"]
    assert len(ok) == sum(s["successes"] for s in stats.values()) == 20

    train_data = f"{out}/{{00000..{len(stats) - 1:05d}}}.tar"  # as passed to --train-data
    num_samples, num_shards = openclip_dataset_size(train_data)
    assert (num_samples, num_shards) == (20, 3)
    errors: list[str] = []
    samples = list(openclip_pipeline(train_data, errors))
    assert errors == []
    assert len(samples) == num_samples
    for image, text in samples:
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
        assert isinstance(text, str) and text.strip()
    good = [r["caption"] for r in rows if r["caption"].strip() and r["url"].startswith(f"{srv.url}/images/")]
    assert sorted(text for _, text in samples) == sorted(r["caption"] for r in ok) == sorted(good)
