"""The training input pipeline (vlm.data.loader.TrainLoader) against a webdataset + torch
DataLoader reference: CPU cost per sample, scaling with data workers, and how long a
training loop waits for data.

Whether the loader keeps an accelerator fed is a question of CPU: a node has so many cores
per accelerator, and every sample costs a decode, a crop and a tokenisation. So:

1. Generates (once, cached in --cache-dir) --images photo-like JPEGs: a colour gradient,
   a few soft-edged shapes and texture at four scales, 256-1024 px a side; serves them
   from a separate process on 127.0.0.1 and runs `vlm data ingest` over them (224 px,
   centre crop, JPEG shards); trains a BPE tokenizer on the captions.
2. per-core: the project's loader and the reference, each with one worker, fetch
   --batches batches of --batch-size after a warm-up; their CPU-seconds are those of
   the process and its workers together (each worker's counters are read while it is
   alive: psutil's children_* times count only children that have been waited for).
   The reference does the same work: webdataset (drawing shards with replacement)
   decodes to PIL, a random resized crop (scale (0.9, 1.0), ratio (3/4, 4/3)) resized
   bicubic to 224, uint8 HWC, the same TextEncoder (once per batch, in the collate
   function, as the project does), batches of the same size from a DataLoader with the
   same number of workers, normalised in the main process with vlm.data.pixels.normalise.
3. scaling: the project's loader with 1 and with 2 workers, samples/s of wall time, twice:
   with the batches sent to PyTorch's meta device, which stands in for an accelerator
   (normalising there costs the CPU nothing, as on a GPU; the headline), and to the CPU,
   where the training process normalises them and competes with the workers for cores.
4. data-wait: the loader's capacity C (one worker, meta device) is measured right before
   each loop (a shared machine's load drifts within minutes); the loop's step is a
   busy-wait of T = B / (C / 1.5) (the loader can deliver 1.5x what the loop takes) and it
   reports the share of its time spent in next_batch waiting for data; medians of both.

Every run line says how many cores its processes kept busy (CPU-s over wall-s): on a
machine shared with other jobs, a two-worker run that got one core cannot scale.

Repeats alternate (the order swapped every repeat, so a busy spell on a shared machine
hits both sides alike) and the medians are printed (for the wall-clock figures also the
best run, the one other jobs disturbed least), with the cores per accelerator that
feeding 2,500 samples/s would take at the measured per-core rate (and at the workers'
rate alone, the normalisation being the accelerator's in training). Run with `nice`.

    nice .venv/bin/python benchmarks/input_pipeline.py            # ~5-8 min on 2 cores, corpus cached
    nice .venv/bin/python benchmarks/input_pipeline.py --quick    # ~1-2 min
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader

from data_pipeline.shards.samples import list_shards
from ingest_throughput import start_server  # benchmarks/ is this script's folder: the same image server
from vlm.config import load_config
from vlm.data.loader import TrainLoader
from vlm.data.pixels import normalise
from vlm.data.tokenizer import TextEncoder, train_tokenizer
from vlm.train.loading import make_batches

REPO = Path(__file__).resolve().parents[1]
VLM = str(Path(sys.executable).parent / "vlm")
IMAGE_SIZE = 224
SCALE, RATIO = (0.9, 1.0), (3 / 4, 4 / 3)
FEED_RATE = 2500  # samples/s an accelerator takes (the figure the cores-per-accelerator line answers)
HEADROOM = 1.5  # the data-wait loop's loader capacity over its demand

# -- the corpus ----------------------------------------------------------------------------

_NOUNS = ("dog", "harbour", "bicycle", "mountain", "kitchen", "market", "forest", "train", "bridge", "garden",
          "child", "lighthouse", "street", "field", "boat", "window", "cat", "table", "river", "tower")
_ADJS = ("old", "red", "quiet", "crowded", "wooden", "bright", "misty", "small", "green", "rusty", "sunlit", "wet")
_PLACES = ("at dusk", "in the rain", "near the sea", "on a hill", "in winter", "after the storm",
           "by the road", "in the morning", "under a grey sky", "in a small town")


def _caption(rng: random.Random) -> str:
    parts = [f"a {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_PLACES)}"]
    for _ in range(rng.randint(0, 3)):
        parts.append(f"with a {rng.choice(_ADJS)} {rng.choice(_NOUNS)}")
    return ", ".join(parts)


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Noise at four scales (blotches to grain), mostly luminance: what makes a JPEG of a
    photograph cost what it does to encode and decode."""
    out = np.zeros((h, w, 3), np.float32)
    for cell, amplitude in ((48, 20.0), (12, 12.0), (3, 6.0), (1, 2.0)):
        cw, ch = max(1, w // cell), max(1, h // cell)
        noise = (rng.standard_normal((ch, cw, 1), np.float32) * amplitude
                 + rng.standard_normal((ch, cw, 3), np.float32) * (amplitude / 4))
        if cell > 1:
            tile = Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8))
            noise = np.asarray(tile.resize((w, h), Image.Resampling.BILINEAR), np.float32) - 128
        out += noise
    return out


def photo_image(seed: int) -> Image.Image:
    """A photo-like RGB image: a two-colour gradient in a random direction, a few
    soft-edged shapes, multi-scale texture; 256-1024 px a side."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(256, 1025, size=2))
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = ((x / w - 0.5) * math.cos(angle) + (y / h - 0.5) * math.sin(angle) + 0.5).clip(0, 1)[..., None]
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    base = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    shapes = base.copy()
    draw = ImageDraw.Draw(shapes)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
        box = (x0, y0, x0 + int(rng.integers(16, w // 2 + 17)), y0 + int(rng.integers(16, h // 2 + 17)))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    shapes = shapes.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 4.0))))
    pixels = np.asarray(shapes, np.float32) + _texture(rng, w, h)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _write_image(args: tuple[int, str]) -> int:
    seed, path = args
    photo_image(seed).save(path, format="JPEG", quality=90)
    return os.path.getsize(path)


def generate_corpus(root: Path, n: int) -> list[str]:
    """Relative paths of n photo-like JPEGs under root, generated unless cached."""
    names = [f"img/{i:06d}.jpg" for i in range(n)]
    marker = root / f"done-{n}.json"
    if not marker.exists():
        (root / "img").mkdir(parents=True, exist_ok=True)
        todo = [(i, str(root / p)) for i, p in enumerate(names) if not (root / p).exists()]
        print(f"generating {len(todo)} photo-like images in {root} ...", flush=True)
        start = time.monotonic()
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_write_image, todo, chunksize=8))
        size = sum((root / p).stat().st_size for p in names)
        print(f"  {time.monotonic() - start:.0f} s, {size / 2**20:.0f} MiB", flush=True)
        marker.write_text(json.dumps({"images": n, "bytes": size}))
    return names


def ingest(cache: Path, n: int) -> Path:
    """Shards of the corpus made by `vlm data ingest` (224 px, centre crop), unless cached."""
    out = cache / f"shards-{n}"
    marker = out / "done.json"
    if marker.exists():
        return out
    root = cache / "corpus"
    names = generate_corpus(root, n)
    rng = random.Random(0)
    proc, url = start_server(root, "keep-alive")
    try:
        table = cache / f"urls-{n}.parquet"
        pq.write_table(pa.table({"url": [f"{url}/{p}" for p in names], "caption": [_caption(rng) for _ in names]}),
                       table)
        shutil.rmtree(out, ignore_errors=True)
        cmd = [VLM, "data", "ingest", "--input", str(table), "--output", str(out), "--no-progress",
               "--metrics-port", "-1", "--set", f"data.ingest.image_size={IMAGE_SIZE}",
               "--set", f"data.ingest.shard_size={max(1, n // 8)}", "--set", "data.ingest.fetch.retries=0",
               "--set", "data.ingest.fetch.allow_private_hosts=[127.0.0.1]"]
        print(f"ingesting {n} images into {out} ...", flush=True)
        start = time.monotonic()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"vlm data ingest failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        print(f"  {time.monotonic() - start:.0f} s", flush=True)
    finally:
        proc.kill()
        proc.wait()
    marker.write_text(json.dumps({"images": n}))
    return out


def tokenizer_json(cache: Path, n: int, vocab_size: int) -> str:
    """A BPE tokenizer trained on the corpus's captions (cached)."""
    path = cache / f"tokenizer-{n}-{vocab_size}.json"
    if not path.exists():
        captions = pq.read_table(cache / f"urls-{n}.parquet", columns=["caption"]).column("caption").to_pylist()
        path.write_text(train_tokenizer(captions, vocab_size=vocab_size).to_str())
    return path.read_text()


# -- the two pipelines ---------------------------------------------------------------------

class Project:
    """The project's TrainLoader over the shards, as the trainer builds it."""

    def __init__(self, shards: Path, cache: Path, images: int, batch_size: int):
        self.cfg = load_config(None, [f"run_dir={cache / 'run'}", f"data.train_shards={shards}",
                                      f"model.vision.image_size={IMAGE_SIZE}",
                                      f"train.micro_batch_size={batch_size}"])
        self.text = TextEncoder.from_json(tokenizer_json(cache, images, self.cfg.tokenizer.vocab_size),
                                          self.cfg.model.text.context_length)

    def loader(self, workers: int, device: str = "cpu") -> TrainLoader:
        make = functools.partial(make_batches, self.cfg, self.text, frozenset(), 0, 1)
        vision = self.cfg.model.vision
        return TrainLoader(make, num_workers=workers, device=device, mean=vision.image_mean, std=vision.image_std,
                           prefetch=self.cfg.data.prefetch_batches)


def reference_crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (area share SCALE, log-uniform aspect in RATIO, 10 tries,
    then the whole image clamped to RATIO)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    w = min(width, round(height * RATIO[1]))
    h = min(height, round(width / RATIO[0]))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class _ReferenceImage:
    """PIL image -> random resized crop at IMAGE_SIZE (bicubic) -> [S, S, 3] uint8."""

    def __init__(self):
        self.rng = random.Random(0)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        box = reference_crop_box(*img.size, self.rng)
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, box=box)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


class _ReferenceCollate:
    """Stacks the images and tokenises the batch's captions in one call."""

    def __init__(self, text: TextEncoder):
        self.text = text

    def __call__(self, samples: list[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        tokens, eot = self.text([caption for _, caption in samples])
        return {"images": torch.stack([img for img, _ in samples]), "tokens": tokens, "eot_index": eot}


class Reference:
    """webdataset + torch DataLoader doing the project's work; normalises in the main process."""

    def __init__(self, project: Project, shards: Path, batch_size: int):
        self.urls = list_shards(str(shards))
        self.text, self.batch_size = project.text, batch_size
        vision = project.cfg.model.vision
        self.mean, self.std = vision.image_mean, vision.image_std
        self.prefetch = project.cfg.data.prefetch_batches
        self._iter = None

    def loader(self, workers: int) -> "Reference":
        dataset = (wds.WebDataset(self.urls, resampled=True, shardshuffle=False, seed=0)
                   .shuffle(1000).decode("pil").to_tuple("jpg", "txt").map_tuple(_ReferenceImage(), None))
        self._iter = iter(DataLoader(dataset, batch_size=self.batch_size, num_workers=workers,
                                     prefetch_factor=self.prefetch, collate_fn=_ReferenceCollate(self.text)))
        return self

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = next(self._iter)
        batch["images"] = normalise(batch["images"], self.mean, self.std)
        return batch

    def close(self) -> None:
        self._iter = None


# -- measuring -----------------------------------------------------------------------------

def cpu_seconds() -> tuple[float, float]:
    """User + system CPU time of (this process, its live descendants: the data workers)."""
    me = psutil.Process()
    workers = 0.0
    for child in me.children(recursive=True):
        try:
            workers += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return sum(me.cpu_times()[:2]), workers


class Run:
    """One timed run: samples, wall seconds, CPU seconds of the training process and of its workers."""

    def __init__(self, samples: int, wall: float, main_cpu: float, worker_cpu: float):
        self.samples, self.wall, self.main_cpu, self.worker_cpu = samples, wall, main_cpu, worker_cpu
        self.cpu = main_cpu + worker_cpu

    def __str__(self) -> str:
        return (f"{self.samples} samples in {self.wall:5.2f} s: {self.samples / self.wall:4.0f} samples/s, "
                f"{self.samples / self.cpu:4.0f} samples/CPU-s (training process {self.main_cpu:5.2f} CPU-s, "
                f"workers {self.worker_cpu:5.2f}; {self.cpu / self.wall:.2f} cores busy)")


def timed_batches(loader, warmup: int, batches: int) -> Run:
    """`batches` batches after `warmup`, timed; then closes the loader."""
    try:
        for _ in range(warmup):
            loader.next_batch()
        (main0, workers0), t0 = cpu_seconds(), time.perf_counter()
        samples = sum(loader.next_batch()["images"].shape[0] for _ in range(batches))
        wall = time.perf_counter() - t0
        main1, workers1 = cpu_seconds()
        return Run(samples, wall, main1 - main0, workers1 - workers0)
    finally:
        loader.close()


def busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def wait_share(loader: TrainLoader, step_s: float, warmup: int, steps: int) -> float:
    """The share of a training loop's time spent waiting in next_batch, its step a
    busy-wait of step_s."""
    try:
        for _ in range(warmup):
            loader.next_batch()
            busy_wait(step_s)
        waited, t0 = 0.0, time.perf_counter()
        for _ in range(steps):
            loader.next_batch()
            waited += loader.last_wait_s
            busy_wait(step_s)
        return waited / (time.perf_counter() - t0)
    finally:
        loader.close()


def alternated(runs: dict, repeat: int, warmup: int, batches: int) -> dict[str, list[Run]]:
    """{name: make_loader} run `repeat` times each, the order reversed every other repeat."""
    results = {name: [] for name in runs}
    names = list(runs)
    for rep in range(repeat):
        for name in (names if rep % 2 == 0 else names[::-1]):
            results[name].append(timed_batches(runs[name](), warmup, batches))
            print(f"  run {rep + 1} {name:<24} {results[name][-1]}", flush=True)
    return results


def median(runs: list[Run], rate) -> float:
    return statistics.median(rate(r) for r in runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--images", type=int, default=1200, help="images in the corpus (default 1200)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/vlm-input-bench"),
                   help="where the corpus, shards and tokenizer are generated and cached")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=30, help="timed batches per run (default 30)")
    p.add_argument("--repeat", type=int, default=5, help="runs of each side per comparison, alternated")
    p.add_argument("--steps", type=int, default=60, help="timed steps of each data-wait loop (default 60)")
    p.add_argument("--quick", action="store_true", help="10 batches, 3 repeats, 25 steps: a quick look")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.repeat, args.steps = 10, 3, 25
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    warmup = 3

    shards = ingest(args.cache_dir, args.images)
    project = Project(shards, args.cache_dir, args.images, args.batch_size)
    reference = Reference(project, shards, args.batch_size)
    print(f"{len(list_shards(str(shards)))} shards of {args.images} {IMAGE_SIZE}-px JPEGs; batch {args.batch_size}, "
          f"{args.batches} timed batches after {warmup} per run, {args.repeat} alternated repeats; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)

    print("per-core (1 worker each, normalised on the CPU in the training process):", flush=True)
    per_core = alternated({"project": lambda: project.loader(1), "reference": lambda: reference.loader(1)},
                          args.repeat, warmup, args.batches)
    print("scaling (project; 'meta': batches go to the meta device, which stands in for an accelerator: "
          "normalising there costs no CPU):", flush=True)
    scaling = alternated({f"{w} worker{'s' * (w > 1)}, {dev}": functools.partial(project.loader, w, dev)
                          for dev in ("meta", "cpu") for w in (1, 2)}, args.repeat, warmup, args.batches)

    per_cpu = {name: median(runs, lambda r: r.samples / r.cpu) for name, runs in per_core.items()}
    per_wall = {name: median(runs, lambda r: r.samples / r.wall) for name, runs in scaling.items()}
    worker_rate = median(per_core["project"], lambda r: r.samples / r.worker_cpu)
    print(f"data-wait (1 worker, meta device; each loop's step set from a capacity run just before it, "
          f"{args.steps} steps):", flush=True)
    shares, steps_s = [], []
    for rep in range(args.repeat):
        capacity = timed_batches(project.loader(1, "meta"), warmup, args.batches)
        steps_s.append(args.batch_size / (capacity.samples / capacity.wall / HEADROOM))
        shares.append(wait_share(project.loader(1, "meta"), steps_s[-1], warmup, args.steps))
        print(f"  run {rep + 1} capacity {capacity.samples / capacity.wall:4.0f} samples/s "
              f"({capacity.cpu / capacity.wall:.2f} cores busy), step {steps_s[-1] * 1e3:4.0f} ms: "
              f"data-wait share {shares[-1] * 100:.1f}%", flush=True)

    p_rate, r_rate = per_cpu["project"], per_cpu["reference"]
    print(f"per-core: project {p_rate:.0f} samples/CPU-s, reference {r_rate:.0f} samples/CPU-s, "
          f"ratio {p_rate / r_rate:.2f}")
    for dev, note in (("meta", "normalised off the CPU, as on an accelerator"),
                      ("cpu", "normalised on the CPU by the training process")):
        a, b = per_wall[f"1 worker, {dev}"], per_wall[f"2 workers, {dev}"]
        best_a, best_b = (max(r.samples / r.wall for r in scaling[f"{w}, {dev}"]) for w in ("1 worker", "2 workers"))
        print(f"scaling: 1 worker {a:.0f} samples/s, 2 workers {b:.0f} samples/s, ratio {b / a:.2f} ({note}; "
              f"best runs {best_a:.0f} and {best_b:.0f}, ratio {best_b / best_a:.2f})")
    print(f"data-wait share: {statistics.median(shares) * 100:.1f}% at a step of "
          f"{statistics.median(steps_s) * 1e3:.0f} ms (best run {min(shares) * 100:.1f}%)")
    print(f"cores per accelerator to feed {FEED_RATE:,} samples/s: {FEED_RATE / p_rate:.1f} at {p_rate:.0f} "
          f"samples/CPU-s; {FEED_RATE / worker_rate:.1f} with normalisation on the accelerator (the data "
          f"workers alone, {worker_rate:.0f} samples/CPU-s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
