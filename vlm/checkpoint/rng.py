"""RNG capture and restore: the one place that reads and sets Python's, NumPy's and torch's generators.

Two scopes: rng_state/set_rng_state (every generator, as plain data, for a checkpoint's
trainer state) and torch_rng_state/set_torch_rng_state (torch's CPU and CUDA generators
only, cheap enough for the gradient cache to snapshot every micro-batch)."""
from __future__ import annotations

import random

import numpy as np
import torch


def torch_rng_state() -> tuple:
    """(CPU state, every CUDA device's state or None without CUDA)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def set_torch_rng_state(snapshot: tuple) -> None:
    """Restores what torch_rng_state() returned (CUDA only when it was captured)."""
    cpu, cuda = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def rng_state() -> dict:
    """Plain data only (NumPy's key as a list of ints), so the trainer state loads without
    NumPy's globals."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    cpu, cuda = torch_rng_state()
    return {"python": random.getstate(), "numpy": (name, key.tolist(), pos, has_gauss, cached),
            "torch": cpu, "cuda": cuda}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]  # a list, or an array in checkpoints written before
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    cuda = state.get("cuda") if torch.cuda.is_available() else None  # saved on a GPU, restored on a CPU: skipped
    set_torch_rng_state((state["torch"], cuda))


def legacy_numpy_globals() -> list:
    """What NumPy's RNG state (an array) needs in trainer states written before rng_state()
    kept it as a list: an array of plain numbers, built by NumPy's own constructor."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray
    return [(multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
            (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def seed_everything(seed: int) -> None:
    """Seeds Python's, numpy's and torch's generators (a fresh run, or after a resume)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
