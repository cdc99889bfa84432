"""`vlm data filter`: rules over the scores choose samples; they are written as a new,
balanced shard set with a manifest of what was kept and why.

Rules, in order: ``min_clip_score`` drops samples below a CLIP score; near-duplicates
(pHashes within ``near_dup_distance`` bits) keep only their best-scored member (ties: the
first key); ``top_fraction`` keeps the best fraction of what remains. The kept samples,
in key order, are cut into ceil(n / shard_size) shards whose sizes differ by at most one,
each written by one Ray task (tar, then ``_stats.json`` as the commit). ``manifest.parquet``
has one row per scored sample (kept or not, the rule that dropped it, the duplicate it
lost to, its output shard); ``manifest.json`` (counts, rules, shard sizes) is written last.
"""
from __future__ import annotations

import json
import math
import posixpath
import time
from collections import Counter, defaultdict

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.config import FilterConfig
from data_pipeline.curate.score import initialised_ray, read_scores
from data_pipeline.shards.format import atomic_write, committed_shards, shard_paths, write_sizes
from data_pipeline.shards.samples import iter_tar_samples
from data_pipeline.shards.write import write_samples


class NearDuplicateIndex:
    """Hamming-ball search over fixed-width hex hashes by pigeonhole banding: two hashes
    within ``distance`` bits agree exactly on at least one of ``distance + 1`` bands, so
    only hashes sharing a band are compared (no all-pairs scan)."""

    def __init__(self, bits: int, distance: int):
        self.distance = distance
        n = distance + 1
        edges = [round(i * bits / n) for i in range(n + 1)]
        self._bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:]) if hi > lo]
        self._buckets: dict[tuple[int, int], list[tuple[int, str]]] = defaultdict(list)

    def find(self, value: int) -> str | None:
        """A key already added within ``distance`` bits of ``value``, else None."""
        for b, (shift, mask) in enumerate(self._bands):
            for other, key in self._buckets.get((b, (value >> shift) & mask), ()):
                if (value ^ other).bit_count() <= self.distance:
                    return key
        return None

    def add(self, value: int, key: str) -> None:
        for b, (shift, mask) in enumerate(self._bands):
            self._buckets[(b, (value >> shift) & mask)].append((value, key))


def select(scores: pa.Table, cfg: FilterConfig) -> list[dict]:
    """The manifest rows: every scored sample with kept/reason/detail, in key order."""
    rows = sorted(scores.to_pylist(), key=lambda r: r["key"])
    if (cfg.min_clip_score is not None or cfg.top_fraction is not None) and any(
            r["clip_score"] is None for r in rows):
        raise ValueError("filter: a CLIP-score rule needs CLIP scores; these were scored without "
                         "a checkpoint (vlm data score --checkpoint PATH)")
    for r in rows:
        r.update(kept=True, reason=None, detail=None, output_shard=None)
    if cfg.min_clip_score is not None:
        for r in rows:
            if r["clip_score"] < cfg.min_clip_score:
                r.update(kept=False, reason="low_clip_score", detail=f"{r['clip_score']:.4f} < {cfg.min_clip_score}")
    best_first = sorted((r for r in rows if r["kept"]),
                        key=lambda r: (-(r["clip_score"] if r["clip_score"] is not None else -math.inf), r["key"]))
    if cfg.near_dup_distance >= 0 and best_first:
        index = NearDuplicateIndex(4 * len(best_first[0]["phash"]), cfg.near_dup_distance)
        survivors = []
        for r in best_first:
            value = int(r["phash"], 16)
            twin = index.find(value)
            if twin is not None:
                r.update(kept=False, reason="near_duplicate", detail=f"of {twin}")
                continue
            index.add(value, r["key"])
            survivors.append(r)
        best_first = survivors
    if cfg.top_fraction is not None:
        keep = math.ceil(cfg.top_fraction * len(best_first))
        for rank, r in enumerate(best_first[keep:], start=keep + 1):
            r.update(kept=False, reason="below_top_fraction", detail=f"rank {rank} of {len(best_first)}")
    return rows


def balanced_sizes(n: int, shard_size: int) -> list[int]:
    """ceil(n / shard_size) shard sizes differing by at most one, summing to n."""
    if n == 0:
        return []
    count = math.ceil(n / shard_size)
    base, extra = divmod(n, count)
    return [base + (i < extra) for i in range(count)]


def write_output_shard(shard_id: int, plan: list[tuple[str, str]], output_dir: str,
                       extra_meta: dict[str, dict]) -> dict:
    """Copy the samples ``plan`` names ((source tar url, key), in order) into shard
    ``shard_id`` of ``output_dir``; the stats file is written last."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    paths = shard_paths(root, shard_id)
    wanted: dict[str, set[str]] = defaultdict(set)
    for tar, key in plan:
        wanted[tar].add(key)
    order = {key: i for i, (_, key) in enumerate(plan)}
    samples: list[dict | None] = [None] * len(plan)
    for tar, keys in wanted.items():
        for sample in iter_tar_samples(tar):
            if sample["__key__"] in keys:
                sample.pop("__shard__", None)
                meta = sample.get("json") or {}
                sample["json"] = {**meta, **extra_meta.get(sample["__key__"], {})}
                samples[order[sample["__key__"]]] = sample
    missing = [plan[i][1] for i, s in enumerate(samples) if s is None]
    if missing:
        raise ValueError(f"filter: {len(missing)} sample(s) not found in their source shards, e.g. {missing[0]}")

    atomic_write(fs, paths["tar"], lambda f: write_samples(f, samples))
    stats = {"shard_id": shard_id, "total": len(plan), "success": len(plan), "failed": 0,
             "failures_by_reason": {}, "sources": sorted(posixpath.basename(t) for t in wanted)}
    atomic_write(fs, paths["stats"], lambda f: f.write(json.dumps(stats, indent=1).encode()))
    return stats


def filter_shards(shard_dir: str, output_dir: str, cfg: FilterConfig, *, scores_dir: str | None = None,
                  progress: bool = True) -> dict:
    """Apply the rules and write the new shard set (on the caller's Ray); returns the manifest summary."""
    from tqdm import tqdm

    start = time.monotonic()
    out_fs, out_root = fsspec.core.url_to_fs(output_dir)
    if out_fs.exists(f"{out_root}/manifest.json") or (out_fs.exists(out_root) and committed_shards(out_fs, out_root)):
        raise FileExistsError(f"{output_dir} already holds a shard set; choose an empty directory")
    rows = select(read_scores(shard_dir, scores_dir), cfg)
    kept = [r for r in rows if r["kept"]]
    base = shard_dir.rstrip("/")
    plans, start_at = [], 0
    for sid, size in enumerate(balanced_sizes(len(kept), cfg.shard_size)):
        chunk = kept[start_at:start_at + size]
        for r in chunk:
            r["output_shard"] = sid
        plans.append([(f"{base}/{r['shard']}", r["key"]) for r in chunk])
        start_at += size
    extra = {r["key"]: {"clip_score": r["clip_score"], "phash": r["phash"]} for r in kept}
    out_fs.makedirs(out_root, exist_ok=True)
    if plans:
        ray = initialised_ray("filter")
        task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=True)(write_output_shard)
        refs = [task.remote(sid, plan, output_dir, {k: extra[k] for _, k in plan})
                for sid, plan in enumerate(plans)]
        for ref in tqdm(refs, unit="shard", disable=not progress, desc="filter"):
            ray.get(ref)
    manifest = pa.Table.from_pylist(
        [{k: r[k] for k in ("key", "shard", "clip_score", "phash", "kept", "reason", "detail", "output_shard")}
         for r in rows])
    atomic_write(out_fs, f"{out_root}/manifest.parquet", lambda f: pq.write_table(manifest, f))
    summary = {
        "source": shard_dir,
        "rules": cfg.model_dump(),
        "scored": len(rows),
        "kept": len(kept),
        "dropped_by_reason": dict(sorted(Counter(r["reason"] for r in rows if not r["kept"]).items())),
        "shard_sizes": [len(p) for p in plans],
        "elapsed_s": round(time.monotonic() - start, 3),
    }
    write_sizes(out_fs, out_root)
    atomic_write(out_fs, f"{out_root}/manifest.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    return summary
