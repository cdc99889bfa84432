"""Peak memory and time of a vocabulary head's cross-entropy, naive vs chunked (CPU).

    nice .venv/bin/python benchmarks/linear_ce_memory.py                 # N 8192 and 16384, H 512, V 32000
    nice .venv/bin/python benchmarks/linear_ce_memory.py --tokens 2048 --chunks 1024x4096 2048x8192
    .venv/bin/python benchmarks/linear_ce_memory.py --help

One forward + backward of `linear_cross_entropy(hidden [N, H], weight [V, H], bias [V],
targets [N])` with gradients for all three inputs (fp32), impl="naive" (F.linear then
F.cross_entropy: the [N, V] logits, their fp32 log-softmax and gradient exist at once)
against impl="torch" (vlm.kernels.linear_ce: tiles of chunk_tokens x chunk_vocab, the
logits recomputed in backward). Each case runs in a fresh process, after a small warm-up
call that loads the kernels.

The memory is the step's own part: the resident high-water mark (VmHWM, reset through
/proc/self/clear_refs once the inputs exist) minus the resident size at that moment. It
includes the gradients themselves (d_weight is V x H, 62.5 MiB at the default size), which
any implementation must produce. glibc keeps freed memory resident, so the children run
with MALLOC_MMAP_THRESHOLD_=65536 (every tensor of 64 KiB or more is its own mapping) and
call malloc_trim(0) before the reset. Time is wall seconds and the process's CPU seconds;
on a shared machine the second is the one to compare.

Measured (2 shared CPU cores, AMD EPYC, torch 2.13 CPU, defaults; wall times were inflated
by other load on the machine, CPU seconds are the comparable figure):

    N      impl     own peak     CPU s (fwd+bwd)
    8192   naive    3009.8 MiB   11.9
    8192   chunked   157.6 MiB   16.8     naive / chunked: peak x19.1, CPU time x0.71
    16384  naive    6010.0 MiB   23.5
    16384  chunked   173.6 MiB   31.2     naive / chunked: peak x34.6, CPU time x0.75

The chunked path does 4 projections' worth of matmul (the logits again in backward) against
the naive 3; its peak is the gradients (d_weight 62.5 MiB, d_hidden 8 to 16 MiB) plus a few
2048 x 4096 fp32 tiles (32 MiB each), nearly independent of N."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(impl: str, n: int, h: int, v: int, chunk_tokens: int, chunk_vocab: int, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    import ctypes

    import torch

    sys.path.insert(0, str(REPO))
    from vlm.kernels.linear_ce import linear_cross_entropy

    torch.set_num_threads(threads)
    kw = dict(impl=impl, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    small = [torch.randn(64, h, requires_grad=True), torch.randn(256, h, requires_grad=True),
             torch.zeros(256, requires_grad=True)]
    linear_cross_entropy(*small, torch.randint(256, (64,)), **kw).backward()  # warm-up: lazy inits, not measured
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).requires_grad_()
    bias = torch.zeros(v).requires_grad_()
    targets = torch.randint(v, (n,), generator=g)
    del small
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS") * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    loss = linear_cross_entropy(hidden, weight, bias, targets, **kw)
    t_fwd = time.perf_counter() - t0
    loss.backward()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_kib("VmHWM") * 1024
    return {"impl": impl, "n": n, "h": h, "v": v, "chunks": f"{chunk_tokens}x{chunk_vocab}", "loss": loss.item(),
            "step_bytes": peak - before, "before_bytes": before, "fwd_s": t_fwd, "step_s": wall, "cpu_s": cpu}


def measure(impl: str, n: int, h: int, v: int, chunks: tuple[int, int], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--child", impl, str(n), str(h), str(v), str(chunks[0]), str(chunks[1]),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"impl": impl, "n": n, "error": (proc.stderr or proc.stdout).strip()[-300:]}
    return json.loads(lines[-1][len("RESULT "):])


def _chunks(text: str) -> tuple[int, int]:
    tokens, vocab = text.lower().split("x")
    return int(tokens), int(vocab)


def _row(r: dict) -> str:
    return (f"N {r['n']:6d}  {r['impl']:5s} {r['chunks'] if r['impl'] != 'naive' else '':>10s}  "
            f"own peak {r['step_bytes'] / 2**20:8.1f} MiB  fwd {r['fwd_s']:6.2f} s  fwd+bwd {r['step_s']:6.2f} s  "
            f"{r['cpu_s']:6.2f} CPU s  loss {r['loss']:.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384], metavar="N")
    ap.add_argument("--hidden", type=int, default=512, metavar="H")
    ap.add_argument("--vocab", type=int, default=32000, metavar="V")
    ap.add_argument("--chunks", type=_chunks, nargs="+", default=[(2048, 4096)], metavar="TxV",
                    help="chunk_tokens x chunk_vocab of the chunked runs (default 2048x4096, the library "
                         "default); several to compare")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        impl, *sizes = args.child
        print("RESULT " + json.dumps(child(impl, *map(int, sizes), threads=args.threads)))
        return 0

    print(f"linear + cross-entropy, forward + backward, fp32, H {args.hidden}, V {args.vocab}, "
          f"{args.threads} threads; own peak = VmHWM above the resident inputs")
    for n in args.tokens:
        print(f"N {n}: the fp32 logits alone are {n * args.vocab * 4 / 2**20:.0f} MiB", flush=True)
        naive = measure("naive", n, args.hidden, args.vocab, (1, 1), args.threads)
        print(_row(naive) if "error" not in naive else f"N {n} naive: failed: {naive['error']}", flush=True)
        for chunks in args.chunks:
            r = measure("torch", n, args.hidden, args.vocab, chunks, args.threads)
            if "error" in r:
                print(f"N {n} torch {chunks}: failed: {r['error']}", flush=True)
                continue
            print(_row(r), flush=True)
            if "error" not in naive:
                print(f"    naive / chunked: own peak x{naive['step_bytes'] / r['step_bytes']:.1f}, "
                      f"CPU time x{naive['cpu_s'] / r['cpu_s']:.2f}, loss diff {abs(naive['loss'] - r['loss']):.1e}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
