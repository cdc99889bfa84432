"""Which loss-kernel implementation runs: the `kernels` setting (auto, triton, torch, naive) resolved per device.

Each kernel (vlm.kernels.contrastive, vlm.kernels.linear_ce) exists as the same tiled
algorithm in plain torch (CPU, CI, the demo) and as Triton kernels (CUDA); `naive` is the
textbook formula kept as the reference and baseline."""
from __future__ import annotations

import importlib.util
import os

import torch

KERNELS = ("auto", "triton", "torch", "naive")


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or anywhere under its CPU interpreter
    (TRITON_INTERPRET=1, what the tests use)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve(kernels: str, device: torch.device) -> str:
    """The config's `kernels` -> the implementation to call on tensors of `device`:
    auto = Triton on CUDA (when installed), else the tiled torch path; triton, torch and
    naive as asked (naive materialises the full logits: the reference and the baseline)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels: {kernels!r} is not one of {', '.join(KERNELS)}")
    if kernels == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if kernels == "triton" and not triton_usable(device):
        raise ValueError(f"kernels: triton needs a CUDA device and the triton package (tensors are on "
                         f"{device.type}); use kernels: torch, or TRITON_INTERPRET=1 to run them on the CPU slowly")
    return kernels
