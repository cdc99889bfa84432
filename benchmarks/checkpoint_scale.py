"""Checkpoint size and save time of a ZeRO-3 run, measured at a few depths of a preset and
extrapolated to the whole model: the figures docs/scaling.md plans a LAION-5B run with.

    nice .venv/bin/python benchmarks/checkpoint_scale.py                         # ViT-L-14, depths 1 2 4, 2 ranks
    nice .venv/bin/python benchmarks/checkpoint_scale.py --preset ViT-B-32 --depths 1 2 3 --world 2

Why measured this way: a whole ViT-L/14 under ZeRO-3 with its Adam state does not fit a
2-core, 24-GiB machine's time budget, but a checkpoint's size is linear in the parameter
count (fp32 weights and two Adam moments per parameter, partitioned over the ranks, plus
a small fixed part: the trainer state, the tokenizer, the config), and so, on one disk, is
its save time. Each depth's run is the real engine (`python -m vlm.train.trainer`, one
process per rank, gloo on 127.0.0.1, fp32, CLIP's 49,408-token tokenizer), one optimizer
step, then one save; the script reads the size of the checkpoint directory and the stall
the trainer prints ("training stalled S s"), fits size = a + b * params and
time = c + d * size by least squares, and prints the whole preset's extrapolation with the
formula. The parameter counts come from the model built on the meta device (no memory).
Local disk only: a save to S3 adds the upload (its bandwidth, not measured here)."""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shards(out: Path, shards: int, per_shard: int, size: int) -> None:
    """Shards of procedural images (the demo corpus) with captions, one or more per rank."""
    import webdataset as wds
    from PIL import Image

    from demo.corpus import make_caption, render_image, train_pairs

    out.mkdir(parents=True, exist_ok=True)
    rng, pairs = np.random.default_rng(0), train_pairs()
    for shard in range(shards):
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as w:
            for i in range(per_shard):
                colour, shape = pairs[int(rng.integers(len(pairs)))]
                pixels, bbox, tone = render_image(rng, colour, shape, 64)
                caption, _ = make_caption(rng, colour, shape, bbox, 64, tone)
                buf = io.BytesIO()
                Image.fromarray(pixels).resize((size, size)).save(buf, format="JPEG", quality=90)
                w.write({"__key__": f"{shard:05d}{i:05d}", "jpg": buf.getvalue(), "txt": caption})
        (out / f"{shard:05d}_stats.json").write_text(f'{{"success": {per_shard}}}')


def params(preset: str, depth: int | None) -> int:
    """Parameters of the preset's model (towers capped at `depth` blocks), built on meta."""
    import torch

    from vlm.models.config import ModelConfig
    from vlm.models.presets import preset_dict
    from vlm.models.registry import build_model

    tree = preset_dict(preset)
    if depth is not None:
        for tower in ("vision", "text"):
            tree[tower] = {**tree[tower], "depth": min(depth, tree[tower]["depth"])}
    with torch.device("meta"):
        model = build_model(ModelConfig(**tree), vocab_size=49408)
    return sum(p.numel() for p in model.parameters())


def measure(args, depth: int) -> tuple[int, float]:
    """One run at `depth`: (checkpoint bytes, seconds the save stalled training)."""
    run_dir = args.work / f"{args.preset}-d{depth}"
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"run_dir={run_dir}", f"data.train_shards={args.work / 'shards'}", f"model.preset={args.preset}",
            f"model.vision.depth={depth}", f"model.text.depth={depth}", "tokenizer.kind=clip",
            "train.zero_stage=3", "train.precision=fp32", "train.micro_batch_size=2", "train.steps=1",
            "train.checkpoint_every=1", "train.keep_checkpoints=0", "train.log_every=1",
            "metrics.enabled=false", "eval.every_steps=0", "data.loader_workers=0"]
    from vlm.config import load_config
    from vlm.data.tokenizer import prepare_tokenizer

    prepare_tokenizer(load_config(None, sets))
    cmd = [sys.executable, "-m", "vlm.train.trainer"] + [a for s in sets for a in ("--set", s)]
    port, procs = free_port(), []
    for rank in range(args.world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(args.world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(args.world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"depth {depth} failed:\n" + "\n".join(o[-3000:] for o in outs))
    stall = float(re.search(r"training stalled ([0-9.]+)s", outs[0]).group(1))
    ckpt = run_dir / "checkpoints" / "step_00000001"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return size, stall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="ViT-L-14")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4], help="tower depths measured")
    p.add_argument("--world", type=int, default=2, help="ranks (processes) of each run")
    p.add_argument("--work", type=Path, default=Path("/tmp/checkpoint_scale"))
    args = p.parse_args(argv)
    if len(set(args.depths)) < 2:
        p.error("--depths needs at least two different depths to fit a line")
    from vlm.models.presets import preset_dict

    args.work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work / "shards", ignore_errors=True)
    write_shards(args.work / "shards", 2 * args.world, 8, preset_dict(args.preset)["vision"]["image_size"])
    rows = []
    for depth in args.depths:
        t0 = time.monotonic()
        size, stall = measure(args, depth)
        n = params(args.preset, depth)
        rows.append((n, size, stall))
        print(f"measured {args.preset} depth {depth}: {n:,} parameters, checkpoint {size / 2**20:.1f} MiB "
              f"({size / n:.2f} bytes/parameter), save stalled training {stall:.2f} s "
              f"({args.world} ranks, run {time.monotonic() - t0:.0f} s)", flush=True)
    n, size, stall = (np.array(c, dtype=float) for c in zip(*rows))
    b, a = np.polyfit(n, size, 1)
    d, c = np.polyfit(size, stall, 1)
    full = params(args.preset, None)
    full_size = a + b * full
    print(f"fit: size = {a / 2**20:.1f} MiB + {b:.3f} bytes x parameters; "
          f"save = {c:.2f} s + {d * 2**30:.2f} s per GiB ({args.world} ranks, this machine's disk)")
    print(f"extrapolated {args.preset} (all {full:,} parameters): checkpoint {full_size / 2**30:.2f} GiB, "
          f"save {c + d * full_size:.1f} s on {args.world} ranks of this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
