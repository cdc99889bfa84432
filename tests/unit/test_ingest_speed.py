"""What ingest's throughput work rests on: the run's registry actor is created after the
first shard tasks (so they get the workers Ray starts with the node) and is still found
and honoured by them, and the benchmark's photo-like corpus really is photo-like (its
PNGs large, unlike the compressible corpus's), so its ratio measures decode-heavy work."""
from __future__ import annotations

import io
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.config import FetchConfig, IngestConfig
from data_pipeline.ingest.dedup import DedupRegistry, RegistryRef
from demo.server import ImageServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ingest_throughput as bench  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray")
    from cluster.ray.session import ray_session

    with ray_session(num_cpus=2, lean=True) as ray:
        yield ray


def test_a_task_submitted_before_the_registry_exists_finds_it(ray_local):
    ray = ray_local
    ref = RegistryRef(f"test-registry-{uuid.uuid4().hex}")

    @ray.remote(num_cpus=1)
    def claim_once(registry_ref: RegistryRef) -> list[str]:
        registry = registry_ref.resolve(timeout_s=60)
        return ray.get(registry.claim.remote(1, [(b"a" * 32, "000010000")]))

    pending = claim_once.remote(ref)
    actor = ray.remote(DedupRegistry).options(num_cpus=0, name=ref.name).remote()
    assert ray.get(pending) == ["000010000"]
    assert ray.get(actor.size.remote()) == 1
    ray.kill(actor)


def test_duplicates_across_shards_are_dropped_with_the_registry_created_late(ray_local, tmp_path):
    from data_pipeline.ingest.driver import ingest

    root = tmp_path / "site"
    root.mkdir()
    for i in range(3):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    with ImageServer(root) as server:
        # shards of 2 rows: the copy of 0.png (shard 1) and 0.png itself (shard 0) race to claim it
        urls = [f"{server.url}/0.png", f"{server.url}/1.png", f"{server.url}/copy/x/0.png", f"{server.url}/2.png"]
        table = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": [f"picture {i}" for i in range(4)]}), table)
        cfg = IngestConfig(shard_size=2, threads=2, image_size=32,
                           fetch=FetchConfig(retries=0, allow_private_hosts=["127.0.0.1"]))
        summary = ingest(str(table), str(tmp_path / "out"), cfg, progress=False)
    rows = [r for sid in (0, 1) for r in pq.read_table(tmp_path / "out" / f"{sid:05d}.parquet").to_pylist()]
    assert (summary.samples_success, summary.samples_failed) == (3, 1)
    assert sorted(r["reason"] or "ok" for r in rows) == ["duplicate", "ok", "ok", "ok"]


def _png_bytes_per_pixel(make, seed: int) -> float:
    img = make(np.random.default_rng(seed))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return len(buf.getvalue()) / (img.width * img.height)


def test_benchmark_photo_corpus_compresses_like_photos():
    photo = [_png_bytes_per_pixel(bench._photo_image, s) for s in range(4)]
    flat = [_png_bytes_per_pixel(bench._compressible_image, s) for s in range(4)]
    assert min(photo) > 1.0  # photographs' PNGs: 1-2.5 bytes a pixel
    assert max(flat) < 0.3
    sizes = [bench._photo_image(np.random.default_rng(s)).size for s in range(8)]
    assert all(200 <= side <= 1200 for size in sizes for side in size)
