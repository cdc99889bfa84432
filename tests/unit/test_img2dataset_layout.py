"""Shard directories in img2dataset's layout: `vlm data inspect` reads their metadata right
(img2dataset's width/height are the resized image's, the original size is in
original_width/original_height; its failures are statuses with a free-text message)."""
from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_pipeline.curate.inspect import summarize


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
