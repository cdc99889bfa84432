"""Peak memory and time of the tiled contrastive loss against the textbook one (CPU).

    nice .venv/bin/python benchmarks/loss_memory.py                  # B = 4096, 16384, 65536; D = 512; softmax
    nice .venv/bin/python benchmarks/loss_memory.py --sizes 4096 --kinds softmax sigmoid   # a quick look
    .venv/bin/python benchmarks/loss_memory.py --help

Each case is one forward + backward of vlm.kernels.contrastive.contrastive_loss, fp32,
one process, in a fresh child process so that peaks do not mix: impl="naive" (the full
B x B logits through autograd) and impl="torch" (the tiled path, `--blocks` or its
defaults). The inputs (image, text [B, D], L2-normalised, requires_grad) exist before the
measurement; a warm-up step at B = 256 loads the code paths; then the child returns freed
memory (MALLOC_MMAP_THRESHOLD_=65536 makes every tensor of 64 KiB or more its own mapping,
malloc_trim(0) the rest), resets the resident high-water mark (/proc/self/clear_refs = 5)
and runs the measured step. "Above inputs" is VmHWM minus the resident size just before
the step: the logits and their gradients, the statistics, the tiles, and the two input
gradients (2 * 4 * D bytes a sample, 4 KB at D = 512) which any implementation returns.
Time: the wall seconds of the step (best of `--repeat`) and its CPU seconds (on a shared
machine the second is the one to compare).

naive is skipped where its logits cannot fit: it holds about four B x B fp32 matrices at
its peak (logits, two log-softmaxes, a gradient), 64 GiB at B = 65536 against this
machine's 24 GiB. Targets (issue text): tiled peak above inputs at most 16 KB a sample; at
most 1/20 of naive at B = 16384; tiled time at most 1.3x naive where naive fits."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAIVE_MATRICES = 4  # B x B fp32 matrices alive at naive's peak (measured: ~4 at B = 4096)
KB_PER_SAMPLE_TARGET = 16_000
NAIVE_RATIO_TARGET = 20
TIME_RATIO_TARGET = 1.3


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(impl: str, kind: str, n: int, d: int, blocks: tuple[int, int] | None, repeat: int, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    import ctypes

    import torch

    sys.path.insert(0, str(REPO))
    from vlm.kernels.contrastive import contrastive_loss

    torch.set_num_threads(threads)

    def inputs(rows):
        g = torch.Generator().manual_seed(0)
        feats = [torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=-1) for _ in range(2)]
        scale = torch.tensor([1 / 0.07])
        bias = torch.tensor([-10.0]) if kind == "sigmoid" else None
        return [t.requires_grad_() for t in feats] + [scale.requires_grad_(), bias]

    def step(image, text, scale, bias):
        for t in (image, text, scale):
            t.grad = None
        block_rows, block_cols = blocks or (None, None)
        contrastive_loss(image, text, scale, bias.requires_grad_() if bias is not None else None, kind=kind,
                         impl=impl, block_rows=block_rows, block_cols=block_cols).backward()

    step(*inputs(256))  # warm-up: code paths, thread pool
    args = inputs(n)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS") * 1024
    walls, cpus = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        step(*args)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    best = min(range(repeat), key=walls.__getitem__)
    peak = _status_kib("VmHWM") * 1024
    return {"impl": impl, "kind": kind, "n": n, "d": d, "before_bytes": before, "peak_bytes": peak,
            "step_bytes": peak - before, "step_s": walls[best], "cpu_s": cpus[best]}


def measure(impl: str, kind: str, n: int, d: int, *, blocks: tuple[int, int] | None = None, repeat: int = 1,
            threads: int | None = None) -> dict:
    """child(...) in a fresh process, or {"error": ...}."""
    threads = threads or os.cpu_count()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
    spec = [impl, kind, str(n), str(d), str(repeat), str(threads)] + [str(b) for b in blocks or ()]
    proc = subprocess.run([sys.executable, __file__, "--child", *spec], capture_output=True, text=True, env=env,
                          cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"impl": impl, "kind": kind, "n": n, "error": (proc.stderr or proc.stdout).strip()[-300:]}
    return json.loads(lines[-1][len("RESULT "):])


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['kind']:8s} {r['n']:6d} {r['impl']:6s} failed: {r['error']}"
    if "skipped" in r:
        return f"{r['kind']:8s} {r['n']:6d} {r['impl']:6s} skipped: {r['skipped']}"
    return (f"{r['kind']:8s} {r['n']:6d} {r['impl']:6s} {r['step_bytes'] / 2**20:12.1f} MiB "
            f"{r['step_bytes'] / r['n'] / 1000:10.1f} KB/sample {r['step_s']:9.2f} s {r['cpu_s']:9.2f} CPU s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536], metavar="B")
    ap.add_argument("--dim", type=int, default=512, metavar="D")
    ap.add_argument("--kinds", nargs="+", choices=["softmax", "sigmoid"], default=["softmax"])
    ap.add_argument("--blocks", type=int, nargs=2, metavar=("ROWS", "COLS"),
                    help="tile of the tiled path (default: contrastive.TORCH_BLOCKS)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--repeat", type=int, default=1, help="measured steps per case; the fastest is reported")
    ap.add_argument("--no-naive", action="store_true", help="measure the tiled path only")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        impl, kind, n, d, repeat, threads, *blocks = args.child
        result = child(impl, kind, int(n), int(d), tuple(map(int, blocks)) or None, int(repeat), int(threads))
        print("RESULT " + json.dumps(result))
        return 0

    blocks = tuple(args.blocks) if args.blocks else None
    print(f"D = {args.dim}, fp32, forward + backward, {args.threads} threads, tiled blocks "
          f"{blocks or 'default'}; peak above inputs")
    for kind in args.kinds:
        for n in args.sizes:
            naive = {"impl": "naive", "kind": kind, "n": n}
            need = NAIVE_MATRICES * n * n * 4
            if args.no_naive:
                naive["skipped"] = "--no-naive"
            elif need > 0.8 * _mem_available():
                naive["skipped"] = (f"needs ~{need / 2**30:.0f} GiB ({NAIVE_MATRICES} B x B fp32 matrices), "
                                    f"{_mem_available() / 2**30:.0f} GiB available")
            else:
                naive = measure("naive", kind, n, args.dim, repeat=args.repeat, threads=args.threads)
            print(_row(naive), flush=True)
            tiled = measure("torch", kind, n, args.dim, blocks=blocks, repeat=args.repeat, threads=args.threads)
            print(_row(tiled), flush=True)
            if "step_bytes" not in tiled:
                continue
            per_sample = tiled["step_bytes"] / n
            verdict = "ok" if per_sample <= KB_PER_SAMPLE_TARGET else "MISSED"
            print(f"    tiled {per_sample / 1000:.1f} KB/sample above inputs (target <= "
                  f"{KB_PER_SAMPLE_TARGET / 1000:.0f}): {verdict}")
            if "step_bytes" in naive:
                mem = naive["step_bytes"] / tiled["step_bytes"]
                slow, slow_cpu = tiled["step_s"] / naive["step_s"], tiled["cpu_s"] / naive["cpu_s"]
                print(f"    naive/tiled memory x{mem:.1f}" +
                      (f" (target >= {NAIVE_RATIO_TARGET}: {'ok' if mem >= NAIVE_RATIO_TARGET else 'MISSED'})"
                       if n >= 16384 else ""))
                print(f"    tiled/naive time x{slow:.2f} wall, x{slow_cpu:.2f} CPU (target <= {TIME_RATIO_TARGET}: "
                      f"{'ok' if min(slow, slow_cpu) <= TIME_RATIO_TARGET else 'MISSED'})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
