"""Training throughput of one GPU: a ViT-B/16 CLIP step at 224 px in bf16, through the real Trainer.

    .venv/bin/python benchmarks/gpu_step.py                       # ViT-B-16, batch 256, 8 loader workers
    .venv/bin/python benchmarks/gpu_step.py --budget 120 --batch 128
    .venv/bin/python benchmarks/gpu_step.py --loader-workers 0    # the in-process loader
    nice .venv/bin/python benchmarks/gpu_step.py --tiny           # CPU smoke run, about 15 s
    .venv/bin/python benchmarks/gpu_step.py --help

Why: the step log gives step_s and data_wait_s per step, but nothing says how fast a
realistic model trains on one GPU or whether the loader keeps up; this script answers both
with the code a run uses (vlm.train.trainer.train: DeepSpeed ZeRO, the shard reader, the
batch loader), not a hand-written loop.

It writes its own shards (photo-like 224 px JPEGs of quality 95, as ingestion writes them:
smooth colour fields, shapes, blur and sensor noise, about 25 KB each, so decoding costs
what a real photo of that size costs; and varied captions),
trains a BPE tokenizer on their captions, and runs `--warmup` + `--steps` optimizer steps
of the ViT-B-16 preset with the CLIP InfoNCE objective, logging every step. Over the timed
steps (the warm-up steps, which compile, fill the allocator and start the loader, are left
out) it prints:

    samples/s: X           timed samples / wall time of the timed steps
    MFU: Y%                3 x forward FLOPs per sample (vlm.models.registry.describe) x
                           samples/s / the device's dense bf16 peak (--peak-tflops, else
                           vlm.observe.metrics.PEAK_BF16_FLOPS by device name)
    data-wait share: W%    sum of train_log.jsonl's data_wait_s / that wall time

The wall time runs from the end of the last warm-up step to the end of the last step, each
end taken once the device has finished the step (the Trainer's should_stop hook, polled
once per step, synchronises and reads the clock): the Trainer does not wait for the
device inside a step, so the log's step_s can leave out device work. The step log's own
view (sum of step_s, samples/s and data wait by it) is printed beside, for comparison.

`--budget` bounds the whole script: no step starts once it has run that long; the Trainer
then saves its one checkpoint (on a GPU about 2 GB for ViT-B-16 with its optimizer state,
seconds) and the figures come from the steps done. The defaults end within about 4 minutes
on an H100 (shards and tokenizer ~20 s with 16 cores, engine ~20 s, steps, save).

`--loader-workers N` passes data.loader_workers=N (data worker processes per rank; 0: the
loader runs in the training process). A tree whose DataConfig has no loader_workers key
runs in-process and says so."""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.shards.format import shard_paths  # noqa: E402
from data_pipeline.shards.write import write_samples  # noqa: E402

COLOURS = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "brown", "grey", "black", "white")
THINGS = ("dog", "cat", "bicycle", "car", "boat", "house", "tree", "mountain", "bird", "horse", "chair", "lamp",
          "bridge", "train", "flower", "cup", "street", "beach", "kitchen", "garden")
PLACES = ("in a park", "on a table", "by the sea", "in the snow", "at night", "in a city", "under a bridge",
          "on a hill", "in a forest", "next to a window", "in the rain", "at sunset")
STYLES = ("a photo of", "a close-up of", "a blurry photo of", "a picture of", "an old photo of", "a bright photo of")
LOADER_KEYS = ("loader_workers", "prefetch_batches")  # DataConfig fields of the multi-process loader


# ---------------------------------------------------------------- synthetic shards

def photo_like(rng: np.random.Generator, size: int) -> Image.Image:
    """A size x size RGB image with the statistics JPEG cares about in a photo: smooth
    colour gradients, a few hard-edged objects, mild blur and sensor noise."""
    grid = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(size // 10, size // 2, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 8.0, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def caption(rng: np.random.Generator) -> tuple[str, str]:
    """(caption, label) of one synthetic sample."""
    colour, thing = COLOURS[rng.integers(len(COLOURS))], THINGS[rng.integers(len(THINGS))]
    text = f"{STYLES[rng.integers(len(STYLES))]} a {colour} {thing} {PLACES[rng.integers(len(PLACES))]}"
    return text, f"{colour} {thing}"


def write_shard(job: tuple[str, int, int, int, int, int]) -> int:
    """One committed shard (tar, then _stats.json) of `count` samples; seeded by its id."""
    out, shard_id, count, per_shard, image_size, seed = job
    rng = np.random.default_rng([seed, shard_id])

    def samples():
        for i in range(count):
            buf = io.BytesIO()
            photo_like(rng, image_size).save(buf, format="JPEG", quality=95)
            text, label = caption(rng)
            yield {"__key__": f"{shard_id:05d}{i:05d}", "jpg": buf.getvalue(), "txt": text,
                   "json": {"label": label, "index": shard_id * per_shard + i}}

    paths = shard_paths(out, shard_id)
    with open(paths["tar"], "wb") as f:
        n = write_samples(f, samples())
    Path(paths["stats"]).write_text(json.dumps({"success": n}))
    return n


def make_shards(out: Path, *, samples: int, per_shard: int, image_size: int, seed: int = 0) -> float:
    """Writes the shards under `out` unless the same set is there already; returns seconds spent."""
    spec = {"samples": samples, "per_shard": per_shard, "image_size": image_size, "seed": seed}
    stamp = out / "gpu_step_shards.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return 0.0
    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n_shards = -(-samples // per_shard)
    jobs = [(str(out), i, min(per_shard, samples - i * per_shard), per_shard, image_size, seed)
            for i in range(n_shards)]
    with multiprocessing.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        pool.map(write_shard, jobs)
    stamp.write_text(json.dumps(spec))
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the run

def overrides(args, run_dir: Path, shards: Path) -> list[str]:
    """The RunConfig of the benchmark as `key=value` overrides of the embedded defaults."""
    out = [f"run_dir={run_dir}", f"data.train_shards={shards}", f"model.preset={'tiny' if args.tiny else 'ViT-B-16'}",
           f"model.vision.image_size={args.image_size}", "objectives=[{name: clip_infonce}]",
           f"train.precision={args.precision}", f"train.micro_batch_size={args.batch}",
           f"train.steps={args.warmup + args.steps}", "train.log_every=1", "train.num_workers=1",
           "train.checkpoint_every=1000000", "train.keep_checkpoints=1", f"kernels={args.kernels}",
           "metrics.enabled=false", "eval.every_steps=0", f"data.loader_workers={args.loader_workers}"]
    if args.prefetch_batches is not None:
        out.append(f"data.prefetch_batches={args.prefetch_batches}")
    return out + list(args.overrides)


def missing_loader_keys(keys: list[str]) -> list[str]:
    """The data.loader_workers / data.prefetch_batches overrides among `keys` that this
    tree's DataConfig has no field for yet."""
    from vlm.config import DataConfig

    loader = {f"data.{name}" for name in LOADER_KEYS if name not in DataConfig.model_fields}
    return [k for k in keys if k.split("=", 1)[0] in loader]


class StepClock:
    """The Trainer's should_stop hook, which it polls once after every step: notes when each
    step ended, once the device has finished it (the Trainer itself does not wait for the
    device inside a step, so step_s alone can miss its work), and stops the run past
    `deadline` (time.monotonic())."""

    def __init__(self, deadline: float):
        import torch

        self.deadline, self.ends = deadline, []
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def __call__(self) -> bool:
        self._sync()
        self.ends.append(time.monotonic())
        return self.ends[-1] > self.deadline


def figures(rows: list[dict], ends: list[float], warmup: int, batch: int) -> dict:
    """The timed steps' (after `warmup`) throughput and data-wait share, by the wall clock
    between the end of the last warm-up step and the end of the last step, and as the
    step log's own sums of step_s."""
    timed = [r for r in rows if r["step"] > warmup]
    wall = ends[len(rows) - 1] - ends[warmup - 1]
    step_s, wait_s = sum(r["step_s"] for r in timed), sum(r["data_wait_s"] for r in timed)
    return {"steps": len(timed), "wall_s": wall, "samples_per_s": batch * len(timed) / wall,
            "wait_share": wait_s / wall, "log_step_s": step_s, "log_samples_per_s": batch * len(timed) / step_s,
            "log_wait_share": wait_s / step_s, "median_step_s": statistics.median(r["step_s"] for r in timed)}


def peak_flops(override_tflops: float | None) -> tuple[float | None, str]:
    """(the device's dense bf16 peak FLOP/s or None, its name)."""
    import torch

    from vlm.observe.metrics import peak_flops_of

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if override_tflops:
        return override_tflops * 1e12, name
    return (peak_flops_of(name) if torch.cuda.is_available() else None), name


def report(f: dict, batch: int, flops_fwd: float | None, peak: float | None) -> None:
    print(f"timed: {f['steps']} steps of {batch} samples in {f['wall_s']:.2f}s wall; step log: sum step_s "
          f"{f['log_step_s']:.2f}s (median {f['median_step_s']:.4f}s), {f['log_samples_per_s']:.1f} samples/s, "
          f"data wait {100 * f['log_wait_share']:.1f}% of step_s")
    if flops_fwd:
        print(f"forward FLOPs per sample: {flops_fwd / 1e9:.4g} G (a training step counted as 3x)")
    print(f"samples/s: {f['samples_per_s']:.1f}")
    if flops_fwd and peak:
        print(f"MFU: {100 * 3 * flops_fwd * f['samples_per_s'] / peak:.1f}% (of {peak / 1e12:.0f} TFLOP/s dense bf16)")
    else:
        print("MFU: n/a (no known bf16 peak for this device: pass --peak-tflops)")
    print(f"data-wait share: {100 * f['wait_share']:.1f}%")


def prepare(args, work: Path):
    """Shards, config and tokenizer of the run -> (RunConfig, tokenizer vocabulary size)."""
    from vlm.config import load_config
    from vlm.data.tokenizer import TOKENIZER_FILE, TextEncoder, prepare_tokenizer

    shards, run_dir = work / "shards", work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    keys = overrides(args, run_dir, shards)
    missing = missing_loader_keys(keys)
    if missing:
        print(f"warning: this tree's DataConfig has no {', '.join(k.split('=')[0] for k in missing)}: "
              "the loader runs in the training process", flush=True)
    cfg = load_config(None, [k for k in keys if k not in missing])
    spent = make_shards(shards, samples=args.samples, per_shard=args.per_shard, image_size=args.shard_size)
    print(f"shards: {args.samples} samples of {args.shard_size} px in {shards}"
          + (f" (written in {spent:.1f}s)" if spent else " (reused)"), flush=True)
    prepare_tokenizer(cfg)
    text = TextEncoder.from_json((run_dir / TOKENIZER_FILE).read_text(), cfg.model.text.context_length)
    return cfg, text.vocab_size


def run(args) -> int:
    t_start = time.monotonic()
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available() and not args.tiny:
        print("no CUDA device: the ViT-B-16 step on CPU would take hours; use --tiny for a smoke run")
        return 2
    from vlm.config import ConfigError
    from vlm.observe.monitor import free_port
    from vlm.train.trainer import forward_flops_per_sample, train

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="vlm-gpu-step-"))
    try:
        try:
            cfg, vocab = prepare(args, work)
        except ConfigError as e:
            print(f"benchmarks/gpu_step.py: {e}")
            return 2
        peak, device = peak_flops(args.peak_tflops)
        print(f"device: {device}; torch {torch.__version__}; model {cfg.model.preset} at "
              f"{cfg.model.vision.image_size} px; precision {cfg.train.precision}; ZeRO-{cfg.train.zero_stage}; "
              f"kernels {cfg.kernels}; micro-batch {cfg.train.micro_batch_size}; "
              f"loader workers {getattr(cfg.data, 'loader_workers', 0)}", flush=True)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        clock, t_engine = StepClock(t_start + args.budget), time.monotonic()
        train(cfg, should_stop=clock,
              on_started=lambda: print(f"engine built in {time.monotonic() - t_engine:.1f}s", flush=True))
        log = Path(cfg.run_dir) / "train_log.jsonl"
        if args.save_log:
            shutil.copyfile(log, args.save_log)
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if len(rows) <= args.warmup:
            print(f"no timed step within --budget {args.budget:g}s: {len(rows)} step(s) done, the first "
                  f"{args.warmup} are warm-up; raise --budget or lower --warmup")
            return 1
        report(figures(rows, clock.ends, args.warmup, cfg.train.micro_batch_size),
               cfg.train.micro_batch_size, forward_flops_per_sample(cfg, vocab), peak)
        print(f"total {time.monotonic() - t_start:.0f}s")
        return 0
    finally:
        if not args.work_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


# What the GPU run measures, and the CPU smoke run (--tiny) that replaces what is not given.
FULL = {"batch": 256, "warmup": 5, "steps": 40, "budget": 180.0, "loader_workers": 8, "precision": "bf16",
        "samples": 4096, "per_shard": 128}
TINY = {"batch": 16, "warmup": 3, "steps": 20, "budget": 100.0, "loader_workers": 2, "precision": "fp32",
        "samples": 256, "per_shard": 32}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, help="micro-batch size (default 256; --tiny 16)")
    ap.add_argument("--warmup", type=int, help="warm-up steps, left out of the figures (default 5; --tiny 3)")
    ap.add_argument("--steps", type=int, help="timed steps after the warm-up (default 40; --tiny 20)")
    ap.add_argument("--budget", type=float, metavar="SECONDS",
                    help="no step starts after this many seconds of the whole script (default 180; --tiny 100)")
    ap.add_argument("--loader-workers", type=int, metavar="N",
                    help="data.loader_workers (default 8; --tiny 2); 0: in the training process")
    ap.add_argument("--prefetch-batches", type=int, metavar="N", help="data.prefetch_batches (default: the config's)")
    ap.add_argument("--precision", choices=("bf16", "fp32", "auto"), help="train.precision (default bf16; --tiny fp32)")
    ap.add_argument("--kernels", choices=("auto", "triton", "torch", "naive"), default="auto",
                    help="the loss kernels (default auto: Triton on CUDA)")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU (default: by device name)")
    ap.add_argument("--samples", type=int, help="synthetic training samples (default 4096; --tiny 256)")
    ap.add_argument("--per-shard", type=int, help="samples per shard (default 128; --tiny 32)")
    ap.add_argument("--work-dir", help="where shards and the run go (kept, shards reused); default a temp dir")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    ap.add_argument("--save-log", metavar="FILE", help="copy train_log.jsonl here")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="another config override (repeatable), e.g. train.zero_stage=1")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny preset at 32 px from 64 px shards")
    args = ap.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1:
        ap.error("--warmup must be at least 1: the timed steps are measured from the end of the last warm-up step")
    args.image_size, args.shard_size = (32, 64) if args.tiny else (224, 224)
    return args


if __name__ == "__main__":
    raise SystemExit(run(parse()))
