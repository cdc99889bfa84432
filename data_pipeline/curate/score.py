"""`vlm data score`: per-sample scores of committed shards, as one parquet file per shard.

For every sample of ``{id}.tar`` it writes ``{id}_scores.parquet`` (key, caption, image
size, a 64-bit DCT perceptual hash for near-duplicate search, and the CLIP score, the
cosine of image and caption embeddings of a model trained by this system). Shards are
scored by a pool of Ray actors, each holding its model once and scoring in batches, on a
GPU when the cluster has one. Each file is written atomically; a rerun skips shards whose
scores exist.

The CLIP model comes from the caller as a *scorer*: any picklable callable taking a batch
of samples ({"__key__", "jpg"/"png"/"webp" bytes, "txt"}) and returning one float each.
This package does not import ``vlm`` (the dependency rule runs cluster -> vlm ->
data_pipeline); ``vlm data score`` builds the scorer from a checkpoint
(``vlm.eval.clip_score``). The caller starts or joins Ray (``cluster.ray.session``).
"""
from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_pipeline.config import ScoreConfig
from data_pipeline.ingest.codec import Rejected, open_image
from data_pipeline.shards.format import IMAGE_EXTS, atomic_write
from data_pipeline.shards.samples import iter_tar_samples, list_shards

SCORE_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("caption", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("phash", pa.string()),
    ("clip_score", pa.float32()),
])
Scorer = Callable[[list[dict]], list[float]]


def scores_path(tar_url: str, output_dir: str | None = None) -> str:
    """``.../00003.tar`` -> ``{output_dir or the tar's directory}/00003_scores.parquet``."""
    directory, name = posixpath.split(tar_url)
    return f"{(output_dir or directory).rstrip('/')}/{name[:-4]}_scores.parquet"


def perceptual_hash(img: Image.Image, hash_size: int = 8) -> str:
    """DCT pHash (imagehash.phash) as hex: close images differ in few bits."""
    import imagehash

    return str(imagehash.phash(img, hash_size=hash_size))


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _image(sample: dict, max_pixels: int) -> Image.Image:
    """The sample's image, decoded within ingest's pixel budget (the header is read first)."""
    where = f"sample {sample.get('__key__')} in {sample.get('__shard__')}"
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:
        raise ValueError(f"{where} has no image")
    try:
        img = open_image(data, max_pixels)
        img.load()
    except Rejected as e:
        raise ValueError(f"{where}: {e.reason}: {e}") from None
    except Exception as e:  # PIL raises many types for hostile input
        raise ValueError(f"{where}: decode_error: {type(e).__name__}: {e}") from None
    return img


def _batches(items: Iterable[dict], n: int) -> Iterable[list[dict]]:
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def score_shard(tar_url: str, out_url: str, cfg: ScoreConfig, scorer: Scorer | None) -> dict:
    """Score one shard into ``out_url``; returns {"shard", "samples", "elapsed_s"}."""
    start = time.monotonic()
    records: dict[str, list[Any]] = {name: [] for name in SCORE_SCHEMA.names}
    for batch in _batches(iter_tar_samples(tar_url), cfg.batch_size):
        images = [_image(sample, cfg.max_pixels) for sample in batch]  # bounded, before the scorer decodes
        clip = scorer(batch) if scorer is not None else [None] * len(batch)
        if len(clip) != len(batch):
            raise ValueError(f"scorer returned {len(clip)} scores for {len(batch)} samples")
        for sample, img, value in zip(batch, images, clip):
            records["key"].append(sample["__key__"])
            records["shard"].append(posixpath.basename(tar_url))
            records["caption"].append(sample.get("txt"))
            records["width"].append(img.width)
            records["height"].append(img.height)
            records["phash"].append(perceptual_hash(img.convert("RGB"), cfg.hash_size))
            records["clip_score"].append(None if value is None else float(value))
    table = pa.table(records, schema=SCORE_SCHEMA)
    fs, path = fsspec.core.url_to_fs(out_url)
    atomic_write(fs, path, lambda f: pq.write_table(table, f))
    return {"shard": tar_url, "samples": table.num_rows, "elapsed_s": round(time.monotonic() - start, 3)}


class ScoreActor:
    """Holds one scorer (one model) for its lifetime and scores whole shards with it."""

    def __init__(self, cfg: ScoreConfig, scorer: Scorer | None):
        self.cfg, self.scorer = cfg, scorer

    def score(self, tar_url: str, out_url: str) -> dict:
        return score_shard(tar_url, out_url, self.cfg, self.scorer)


@dataclass
class ScoreSummary:
    shards_total: int = 0
    shards_skipped: int = 0
    shards_scored: int = 0
    samples: int = 0
    elapsed_s: float = 0.0

    def format(self) -> str:
        rate = self.samples / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (f"shards    {self.shards_total} total, {self.shards_skipped} skipped, "
                f"{self.shards_scored} scored\nsamples   {self.samples} scored\n"
                f"elapsed   {self.elapsed_s:.1f} s ({rate:.1f} samples/s)")


def initialised_ray(what: str):
    """The caller's Ray: this package never starts or joins one (that is
    cluster.ray.session.ray_session's job)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"data_pipeline {what} needs an initialised Ray: run it inside "
                           f"cluster.ray.session.ray_session()")
    return ray


def _actor_count(ray, cfg: ScoreConfig, gpus: int) -> int:
    if cfg.actors:
        return cfg.actors
    if gpus:
        return gpus
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // 2)


def score(shard_dir: str, cfg: ScoreConfig, *, scorer: Scorer | None = None,
          output_dir: str | None = None, progress: bool = True) -> ScoreSummary:
    """Score every committed shard of ``shard_dir`` that has no scores yet (on the caller's Ray)."""
    from tqdm import tqdm

    start = time.monotonic()
    shards = list_shards(shard_dir)
    summary = ScoreSummary(shards_total=len(shards))
    todo = []
    for tar in shards:
        out = scores_path(tar, output_dir)
        fs, path = fsspec.core.url_to_fs(out)
        if fs.exists(path):
            summary.shards_skipped += 1
        else:
            todo.append((tar, out))
    if output_dir:
        fs, path = fsspec.core.url_to_fs(output_dir)
        fs.makedirs(path, exist_ok=True)
    if todo:
        ray = initialised_ray("score")
        from ray.util import ActorPool

        gpus = int(ray.cluster_resources().get("GPU", 0))
        options = {"num_gpus": 1, "num_cpus": 1} if gpus and scorer is not None else {"num_cpus": 1}
        n = min(_actor_count(ray, cfg, gpus), len(todo))
        actor = ray.remote(ScoreActor).options(**options)
        pool = ActorPool([actor.remote(cfg, scorer) for _ in range(n)])
        results = pool.map_unordered(lambda a, job: a.score.remote(*job), todo)
        for result in tqdm(results, total=len(todo), unit="shard", disable=not progress, desc="score"):
            summary.shards_scored += 1
            summary.samples += result["samples"]
    summary.elapsed_s = time.monotonic() - start
    return summary


def read_scores(shard_dir: str, scores_dir: str | None = None) -> pa.Table:
    """All ``*_scores.parquet`` of the committed shards of ``shard_dir``, one table;
    raises ``FileNotFoundError`` naming a shard that has not been scored."""
    tables = []
    for tar in list_shards(shard_dir):
        out = scores_path(tar, scores_dir)
        fs, path = fsspec.core.url_to_fs(out)
        if not fs.exists(path):
            raise FileNotFoundError(f"{tar} has no scores ({out}): run `vlm data score` first")
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, schema=SCORE_SCHEMA))
    return pa.concat_tables(tables) if tables else SCORE_SCHEMA.empty_table()
