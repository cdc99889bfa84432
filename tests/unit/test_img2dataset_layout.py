"""Shard directories in img2dataset's layout: `vlm data inspect` reads their metadata right
(img2dataset's width/height are the resized image's, the original size is in
original_width/original_height; its failures are statuses with a free-text message), and
`ingest_shard` writes that layout, and still retries shards written in the older one."""
from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.config import FetchConfig, IngestConfig
from data_pipeline.curate.inspect import summarize
from data_pipeline.ingest.runners import RunRegistry
from data_pipeline.ingest.shard import ingest_shard
from demo.config import CorpusConfig
from demo.corpus import generate_corpus
from demo.server import BROKEN_ENDPOINTS, ImageServer


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_shard(root, originals: list[tuple[int, int]], failed: int) -> None:
    """One shard as img2dataset 1.47 writes it: 00000.tar (jpg, txt, json per success),
    00000.parquet (one row per input row) and 00000_stats.json."""
    rows = []
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i, (w, h) in enumerate(originals):
            key = f"{i:09d}"
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (i * 40 % 256, 90, 160)).save(buf, "JPEG")
            meta = {"url": f"http://example.invalid/{i}.jpg", "caption": f"picture {i}", "key": key,
                    "status": "success", "error_message": None, "width": 64, "height": 64,
                    "original_width": w, "original_height": h}
            _add(tar, f"{key}.jpg", buf.getvalue())
            _add(tar, f"{key}.txt", meta["caption"].encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            rows.append(meta)
    for j in range(failed):
        i = len(originals) + j
        rows.append({"url": f"http://example.invalid/{i}.jpg", "caption": f"picture {i}", "key": f"{i:09d}",
                     "status": "failed_to_download", "error_message": "HTTP Error 404: Not Found",
                     "width": None, "height": None, "original_width": None, "original_height": None})
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    stats = {"count": len(rows), "successes": len(originals), "failed_to_download": failed,
             "failed_to_resize": 0, "status_dict": {"success": len(originals),
                                                    "HTTP Error 404: Not Found": failed}}
    (root / "00000_stats.json").write_text(json.dumps(stats))


def test_inspect_reads_img2dataset_original_sizes_and_statuses(tmp_path):
    write_img2dataset_shard(tmp_path, [(800, 600), (1500, 300), (300, 1500)], failed=2)
    info = summarize(str(tmp_path))
    assert info["samples"] == {"total": 5, "success": 3, "failed": 2}
    # the originals, not the resized 64 x 64 that img2dataset keeps in width/height
    assert info["original_width"]["512-1023"] == 1 and info["original_width"]["1024-2047"] == 1
    assert info["original_width"]["256-511"] == 1 and info["original_width"]["0-63"] == 0
    assert [info["original_height"][b] for b in ("256-511", "512-1023", "1024-2047")] == [1, 1, 1]
    assert info["failures_by_reason"] == {"failed_to_download": 2}


def test_inspect_counts_from_img2dataset_stats_without_status_tables(tmp_path):
    write_img2dataset_shard(tmp_path, [(800, 600), (640, 480)], failed=3)
    (tmp_path / "00000.parquet").unlink()  # img2dataset can be told to write no parquet
    assert summarize(str(tmp_path))["samples"] == {"total": 5, "success": 2, "failed": 3}


# ---------------------------------------------------------------- what ingest writes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    corpus = generate_corpus(CorpusConfig(num_train=4, num_heldout=0, image_size=48),
                             tmp_path_factory.mktemp("corpus"))
    with ImageServer(corpus.root) as srv:
        yield srv


def _cfg() -> IngestConfig:
    fetch = FetchConfig(deadline_s=1.5, retries=0, backoff_s=0.05, allow_private_hosts=["127.0.0.1"])
    return IngestConfig(shard_size=16, threads=4, image_size=64, fetch=fetch)


def _image(server, i: int) -> str:
    return f"{server.url}/images/train/{i:06d}.png"


def test_ingest_writes_img2dataset_columns_and_stats(server, tmp_path):
    rows = [{"url": _image(server, 0), "caption": "a picture"},
            {"url": _image(server, 1), "caption": "another picture"},
            {"url": server.url + BROKEN_ENDPOINTS["missing"], "caption": "missing"},
            {"url": _image(server, 2), "caption": " "},  # dropped before any download
            {"url": server.url + BROKEN_ENDPOINTS["not_an_image"], "caption": "not an image"},
            {"url": server.url + "/copy/x/images/train/000000.png", "caption": "a copy"}]
    stats = ingest_shard(rows, 0, str(tmp_path), _cfg())
    table = pq.read_table(tmp_path / "00000.parquet")
    assert "error" not in table.column_names
    got = table.to_pylist()
    assert [r["status"] for r in got] == ["success", "success", "failed_to_download", "failed_to_download",
                                          "failed_to_resize", "failed_to_resize"]
    assert [r["reason"] for r in got] == [None, None, "http_404", "no_caption", "decode_error", "duplicate"]
    assert got[0]["error_message"] is None and got[3]["error_message"] == "no_caption"  # no text: the reason
    assert got[5]["error_message"] == "same image as 000000000"
    for r in got[:2]:  # stored (resized) size vs the downloaded image's
        assert (r["width"], r["height"], r["original_width"], r["original_height"]) == (64, 64, 48, 48)
        assert len(r["sha256"]) == 64
    assert all(r["width"] is None and r["height"] is None for r in got[2:])  # nothing stored
    assert (got[5]["original_width"], got[3]["original_width"]) == (48, None)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert {k: meta[k] for k in ("status", "error_message", "width", "height", "original_width",
                                 "original_height")} == {"status": "success", "error_message": None, "width": 64,
                                                         "height": 64, "original_width": 48, "original_height": 48}

    on_disk = json.loads((tmp_path / "00000_stats.json").read_text())
    for s in (stats, on_disk):
        assert (s["count"], s["successes"], s["failed_to_download"], s["failed_to_resize"]) == (6, 2, 2, 2)
        assert (s["total"], s["success"], s["failed"]) == (6, 2, 4)  # this project's, as before
        assert s["failures_by_reason"] == {"decode_error": 1, "duplicate": 1, "http_404": 1, "no_caption": 1}
        assert s["status_dict"]["success"] == 2 and s["status_dict"]["no_caption"] == 1
        assert sum(s["status_dict"].values()) == 6
        assert s["start_time"] <= s["end_time"] and s["duration"] >= 0
    widths = summarize(str(tmp_path))["original_width"]
    assert (widths["0-63"], widths["64-127"]) == (2, 0)  # the originals (48 px), not the stored 64


def _write_old_layout_shard(root, server) -> list[dict]:
    """A shard as ingest wrote it before img2dataset's names: status success/failed, an
    ``error`` column, width/height the ORIGINAL size. Row 0 succeeded (its stored image is
    40 x 30 here), row 1 timed out (transient: retried), row 2 got a 404 (kept as it is)."""
    rows = [{"url": _image(server, i), "caption": f"picture {i}"} for i in range(3)]
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG")
    with tarfile.open(root / "00000.tar", "w") as tar:
        _add(tar, "000000000.jpg", buf.getvalue())
        _add(tar, "000000000.txt", b"picture 0")
        _add(tar, "000000000.json", json.dumps({"key": "000000000", "status": "success", "width": 48}).encode())
    old = [("success", None, None, 48, 48, "ab" * 32), ("failed", "timeout", "timed out", None, None, None),
           ("failed", "http_404", "HTTP 404", None, None, None)]
    pq.write_table(pa.Table.from_pylist([
        {"key": f"00000{i:04d}", "url": r["url"], "caption": r["caption"], "status": status, "reason": reason,
         "error": error, "width": w, "height": h, "sha256": sha, "language": None}
        for i, (r, (status, reason, error, w, h, sha)) in enumerate(zip(rows, old))]), root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"shard_id": 0, "total": 3, "success": 1, "failed": 2,
                                                       "failures_by_reason": {"http_404": 1, "timeout": 1}}))
    return rows


def test_old_layout_shard_is_read_and_retried_into_the_new_one(server, tmp_path):
    rows = _write_old_layout_shard(tmp_path, server)
    registry = RunRegistry()
    assert registry.load_committed(str(tmp_path), [0]) == 1  # its one success's hash
    info = summarize(str(tmp_path))
    assert info["samples"] == {"total": 3, "success": 1, "failed": 2}
    assert info["failures_by_reason"] == {"timeout": 1, "http_404": 1}
    assert info["original_width"]["0-63"] == 1  # the old width: the original, 48

    before = server.request_count
    stats = ingest_shard(rows, 0, str(tmp_path), _cfg(), retry_failed=True)
    assert server.request_count == before + 1  # only the timed-out row
    got = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert [r["status"] for r in got] == ["success", "success", "failed_to_download"]
    sizes = [(r["width"], r["height"], r["original_width"], r["original_height"]) for r in got]
    assert sizes == [(40, 30, 48, 48), (64, 64, 48, 48), (None, None, None, None)]
    assert (got[2]["reason"], got[2]["error_message"]) == ("http_404", "HTTP 404")
    assert (stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (2, 1, 0)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert sorted(n for n in tar.getnames() if n.endswith(".jpg")) == ["000000000.jpg", "000000001.jpg"]
