"""Peak memory of one training step with and without the gradient cache.

    .venv/bin/python benchmarks/gradcache_memory.py            # global 64, 256, 1024; micro 32
    .venv/bin/python benchmarks/gradcache_memory.py --help

Each measurement runs in a fresh process: the real DeepSpeed engine (1 process, gloo,
ZeRO-2, fp32 on CPU or bf16 on a GPU) around a ViT/Transformer CLIP with symmetric InfoNCE,
one warm-up step at the same setting, then the peak of the measured step. On CPU the peak
is the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs just
before the step); on a GPU, torch.cuda.max_memory_allocated. Both are reported as the
absolute peak and as the step's own part: the peak above what was resident before the step
(model, optimizer state, and the global batch's inputs, which a loader holds anyway).

Without the cache the step is one micro-batch of the whole global batch per worker (the
contrastive batch is what fits); with it, global / micro micro-batches of `--micro`.
Target (issue 6): with the cache, the peak at global 1024 within 1.25x of the peak at 64.
The model is chosen so that activations dominate inputs: 32 px images in 4 px patches (65
tokens) through 4 blocks of width 128 (MLP ratio 4) keep about 3 MB of activations per
sample against 12 KB of pixels, and it is small enough to measure 1024 samples on 2 CPU
cores in a few minutes.

CPU measurement: glibc keeps freed memory resident, which would hide a step's peak behind
the warm-up's leftovers, so the children run with MALLOC_MMAP_THRESHOLD_=65536 (every
tensor of 64 KiB or more is its own mapping, returned on free) and call malloc_trim(0)
before the reset. Time is printed as wall seconds and as the process's CPU seconds (on a
shared machine the second is the one to compare)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.embed_dim=128", "model.vision.image_size=32", "model.vision.patch_size=4", "model.vision.width=128",
         "model.vision.depth=4", "model.vision.heads=4", "model.vision.mlp_ratio=4", "model.text.width=128",
         "model.text.depth=2", "model.text.heads=4", "model.text.context_length=16", "data.ingest.image_size=32",
         "train.zero_stage=2"]
VOCAB = 1000


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(global_batch: int, micro: int, cached: bool, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("BENCH_PORT", "29581"))
    import torch
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    sys.path.insert(0, str(REPO))
    from vlm.train import gradcache
    from vlm.config import load_config
    from vlm.train.deepspeed_config import deepspeed_config
    from vlm.train.module import build_pretrainer
    from vlm.train.optim import lr_lambda, param_groups

    torch.set_num_threads(threads)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    m = micro if cached else global_batch
    cfg = load_config(None, [*MODEL, f"train.micro_batch_size={m}", f"train.global_batch_size={global_batch}",
                             f"train.grad_cache={cached}"])
    torch.manual_seed(0)
    model = build_pretrainer(cfg, VOCAB)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
                                      config=deepspeed_config(cfg, 1, torch.cuda.is_available()))
    dev = engine.device
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(global_batch, 3, 32, 32, generator=g),
             "tokens": torch.randint(1, VOCAB, (global_batch, 16), generator=g),
             "eot_index": torch.randint(2, 16, (global_batch,), generator=g)}
    micro_batches = [{k: v[i:i + m].to(dev) for k, v in batch.items()} for i in range(0, global_batch, m)]

    def step():
        if cached:
            gradcache.cached_step(engine, micro_batches)
            engine.step()
        else:
            for b in micro_batches:
                engine.backward(engine(b)["loss"])
                engine.step()

    step()  # warm-up: optimizer state, allocator pools
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _rss_kib() * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    if on_gpu:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _hwm_kib() * 1024
    return {"global": global_batch, "micro": m, "cached": cached, "peak_bytes": peak, "before_bytes": before,
            "step_bytes": peak - before, "step_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "device": torch.cuda.get_device_name() if on_gpu else "cpu"}


def measure(global_batch: int, micro: int, cached: bool, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(global_batch), str(micro), str(int(cached)),
                           "--threads", str(threads)], capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"global": global_batch, "cached": cached, "error": (proc.stderr or proc.stdout).strip()[-300:]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--global-batches", type=int, nargs="+", default=[64, 256, 1024], metavar="N")
    ap.add_argument("--micro", type=int, default=32, help="micro-batch of the cached runs (default 32)")
    ap.add_argument("--no-cache-max", type=int, default=256, metavar="N",
                    help="largest global batch also run without the cache (default 256)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.child[1], bool(args.child[2]), args.threads)))
        return 0

    print("model: ViT 32px/4px patches (65 tokens), width 128, depth 4, MLP x4; text width 128, depth 2, "
          "16 tokens; embed 128; InfoNCE; DeepSpeed ZeRO-2, 1 process")
    rows = []
    for n in args.global_batches:
        for cached in (True, False):
            if not cached and n > args.no_cache_max:
                continue
            r = measure(n, args.micro, cached, args.threads)
            rows.append(r)
            if "error" in r:
                print(f"global {n:5d} {'cache' if cached else 'plain'}: failed: {r['error']}", flush=True)
                continue
            print(f"global {n:5d} {'cache   ' if cached else 'no cache'} micro {r['micro']:5d}: "
                  f"peak {r['peak_bytes'] / 2**20:8.1f} MiB, step's own {r['step_bytes'] / 2**20:8.1f} MiB, "
                  f"{r['step_s']:.1f} s/step, {r['cpu_s']:.1f} CPU s ({r['device']})", flush=True)
    cached = {r["global"]: r for r in rows if r.get("cached") and "error" not in r}
    base = cached.get(min(args.global_batches))
    if base:
        for n, r in sorted(cached.items()):
            print(f"with the cache, global {n} vs {base['global']}: peak x{r['peak_bytes'] / base['peak_bytes']:.3f}, "
                  f"step's own x{r['step_bytes'] / base['step_bytes']:.3f}")
    for n, r in sorted(cached.items()):
        plain = next((p for p in rows if p["global"] == n and not p.get("cached") and "error" not in p), None)
        if plain:
            print(f"global {n}: no cache / cache peak x{plain['peak_bytes'] / r['peak_bytes']:.2f}, "
                  f"step's own x{plain['step_bytes'] / r['step_bytes']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
