"""Memory and time of the loss kernels on one GPU: naive vs tiled torch vs Triton.

    .venv/bin/python benchmarks/gpu_kernels.py                 # the whole table, under 5 minutes on an H100/H200
    .venv/bin/python benchmarks/gpu_kernels.py --budget 120    # stop starting new cases after 120 s
    .venv/bin/python benchmarks/gpu_kernels.py --help

Contrastive (softmax InfoNCE, both directions, bf16 inputs, D = 512): B = 4096 ... 1,048,576
(2^12 ... 2^20) where each implementation fits: naive materialises B x B logits and their
softmaxes (stopped past 65536), the tiled torch path loops over tiles in Python (stopped past
262144, where its launch overhead alone is minutes), Triton runs every size. Fused linear
cross-entropy (bf16, H = 1024, V = 32000 and 128256): N = 8192 ... 131072 tokens.

Each case: one warm-up forward+backward, then `--repeat` timed ones (CUDA events); memory is
torch.cuda.max_memory_allocated during the timed pass minus what was allocated before it
(the inputs), i.e. the loss's own working memory, gradients included. Results print as
they come (a case that runs out of memory prints OOM), so a run cut short by the device's
time limit still leaves every finished line. Needs CUDA; on CPU use benchmarks/loss_memory.py."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.kernels.contrastive import contrastive_loss  # noqa: E402
from vlm.kernels.linear_ce import linear_cross_entropy  # noqa: E402

MIB = 2 ** 20
CONTRASTIVE_LIMITS = {"naive": 65536, "torch": 262144, "triton": 2 ** 20}
CE_LIMITS = {"naive": 65536, "torch": 131072, "triton": 131072}


def measure(run, repeat: int) -> tuple[float, float]:
    """(peak MiB above the memory allocated before, median ms) of run() = forward + backward."""
    run()  # warm-up: compiles the Triton kernels, fills the caching allocator
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / MIB
    return peak, sorted(times)[len(times) // 2]


def contrastive_case(b: int, d: int, impl: str, repeat: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", generator=g), dim=1)
    text = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", generator=g), dim=1)
    image = image.to(torch.bfloat16).requires_grad_()
    text = text.to(torch.bfloat16).requires_grad_()
    scale = torch.tensor([14.3], device="cuda", requires_grad=True)

    def run():
        image.grad = text.grad = scale.grad = None
        contrastive_loss(image, text, scale, kind="softmax", impl=impl).backward()

    return measure(run, repeat)


def ce_case(n: int, h: int, v: int, impl: str, repeat: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(n, h, device="cuda", generator=g) / h ** 0.5).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) / h ** 0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(v, (n,), device="cuda", generator=g)
    targets[::7] = -100

    def run():
        hidden.grad = weight.grad = None
        linear_cross_entropy(hidden, weight, None, targets, impl=impl).backward()

    return measure(run, repeat)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=240.0, metavar="SECONDS",
                    help="start no new case after this many seconds (default 240)")
    ap.add_argument("--repeat", type=int, default=3, metavar="N", help="timed passes per case (default 3)")
    ap.add_argument("--dim", type=int, default=512, metavar="D", help="contrastive feature size (default 512)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py needs a CUDA GPU (benchmarks/loss_memory.py measures the CPU paths)")
        return 2
    t0 = time.monotonic()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    def over_budget() -> bool:
        return time.monotonic() - t0 > args.budget

    print(f"\ncontrastive softmax, bf16, D={args.dim}: peak MiB above inputs / median ms (fwd+bwd)", flush=True)
    print(f"{'B':>9} {'naive':>22} {'torch tiled':>22} {'triton':>22}", flush=True)
    b = 4096
    while b <= 2 ** 20 and not over_budget():
        cells = []
        for impl in ("naive", "torch", "triton"):
            if b > CONTRASTIVE_LIMITS[impl] or over_budget():
                cells.append("-")
                continue
            try:
                peak, ms = contrastive_case(b, args.dim, impl, args.repeat)
                cells.append(f"{peak:9.1f} / {ms:9.1f}")
            except torch.OutOfMemoryError:
                cells.append("OOM")
            torch.cuda.empty_cache()
        print(f"{b:>9} " + " ".join(f"{c:>22}" for c in cells), flush=True)
        b *= 2 if b < 65536 else 4

    for v in (32000, 128256):
        print(f"\nlinear cross-entropy, bf16, H=1024, V={v}: peak MiB above inputs / median ms", flush=True)
        print(f"{'N':>9} {'naive':>22} {'torch chunked':>22} {'triton':>22}", flush=True)
        for n in (8192, 32768, 131072):
            if over_budget():
                break
            cells = []
            for impl in ("naive", "torch", "triton"):
                if n > CE_LIMITS[impl] or over_budget():
                    cells.append("-")
                    continue
                try:
                    peak, ms = ce_case(n, 1024, v, impl, args.repeat)
                    cells.append(f"{peak:9.1f} / {ms:9.1f}")
                except torch.OutOfMemoryError:
                    cells.append("OOM")
                torch.cuda.empty_cache()
            print(f"{n:>9} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    print(f"\ntotal {time.monotonic() - t0:.0f} s" + (" (budget reached: later cases skipped)" if over_budget() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
