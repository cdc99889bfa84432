"""Loading checkpoint files as tensors and plain data only: the allow-list, load, check_files, weights_only_loads.

Trust (DESIGN.md, "Trust boundaries"): whoever can write a checkpoint directory (a shared
volume, a bucket) can also rewrite its manifest, so the manifest proves completeness, not
origin. Hence every checkpoint file is unpickled as tensors and plain data only
(`load`: weights_only, allowing three DeepSpeed types), DeepSpeed's own loads included
(`check_files` + `weights_only_loads`). A file that needs anything else raises
UnsafeCheckpointError, which is never a reason to fall back to an older checkpoint: it is
refused outright."""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

from vlm.checkpoint.layout import TRAINER_STATE, UnsafeCheckpointError
from vlm.checkpoint.rng import legacy_numpy_globals

_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"

# Beyond tensors and plain containers (which weights_only loads by default), the files of a
# checkpoint hold only these, found by saving real checkpoints at ZeRO 0-3 (fp32), with the
# optimizer offloaded, and converting them to the universal format (DeepSpeed 0.19): the
# ZeRO stage (an int enum), the static loss scaler of the ZeRO optimizers (attributes only)
# and the fragment addresses of their parameter slice mappings (a dataclass; the bf16
# optimizer of GPU runs saves the same, by its state_dict). Building any of them runs no
# code beyond setting attributes.
_DEEPSPEED_GLOBALS = (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address"))
_registered = False


def _register_safe_globals() -> None:
    """Adds DeepSpeed's few types to torch's allow-list, process-wide: DeepSpeed's own
    loads (forced to weights_only by weights_only_loads) consult it too."""
    global _registered
    if _registered:
        return
    import importlib

    if "deepspeed" not in sys.modules:  # its import inspects the accelerator
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    torch.serialization.add_safe_globals([getattr(importlib.import_module(m), n) for m, n in _DEEPSPEED_GLOBALS])
    _registered = True


def _refused(path: Path, error: Exception) -> list[str]:
    """The globals a refused file needs that are not allowed: torch lists them without
    unpickling (its error message names the first). None for a file that is merely not
    a pickle torch reads (garbage): unreadable, not unsafe."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        found = []
    return found or re.findall(r"GLOBAL (\S+)", str(error))[:1]


def load(path: str | os.PathLike, *, mmap: bool = False):
    """torch.load restricted to tensors, plain data and the allow-list above: a file that
    needs anything else raises UnsafeCheckpointError naming the file and the global, and
    nothing of it runs. An unreadable file raises ValueError."""
    path = Path(path)
    _register_safe_globals()
    extra = legacy_numpy_globals() if path.name == TRAINER_STATE else []
    mmap = mmap and zipfile.is_zipfile(path)  # torch's legacy format cannot be mapped: read it whole
    with torch.serialization.safe_globals(extra):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            refused = _refused(path, e)
            if not refused:
                raise ValueError(f"checkpoint file {path} is unreadable: not a pickle that torch reads") from None
            needs = f"the global{'s' if len(refused) > 1 else ''} {', '.join(refused)}"
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint file {path}: it needs {needs}, which is not on the allow-list "
                f"of tensors and plain data (a tampered or foreign file; nothing of it was run)",
                path=path, needs=needs) from None
        except FileNotFoundError:
            raise
        except Exception as e:  # torn or garbage: torch's unpickler fails in many ways
            raise ValueError(f"checkpoint file {path} is unreadable: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]}") from None


def check_files(ckpt: Path) -> None:
    """Loads every .pt file under `ckpt` (subdirectories too: a universal checkpoint's
    zero/) the way `load` does, without reading the tensors (mmap): what DeepSpeed opens
    next is then known to hold nothing but allowed data. Raises UnsafeCheckpointError on
    the first that does not. An unreadable one (torn, garbage) is the manifest's business
    (verify), as before; whatever reads it later loads it weights_only too."""
    for p in sorted(Path(ckpt).rglob("*.pt")):
        try:
            load(p, mmap=True)
        except UnsafeCheckpointError:
            raise
        except ValueError:
            pass


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every torch.load of this process runs with weights_only=True and the
    allow-list, whatever its caller passes: DeepSpeed's load_checkpoint, its ZeRO
    optimizers, ds_to_universal, universal_checkpoint and zero_to_fp32 each call torch.load
    (weights_only=False) themselves, and which of them do changes between DeepSpeed
    versions. So rather than a checkpoint engine of ours (which only some of those paths
    use), torch's own switch, TORCH_FORCE_WEIGHTS_ONLY_LOAD, covers them all. Callers run
    check_files first, for an error that names the file; this closes the window between
    that check and DeepSpeed's reads."""
    _register_safe_globals()
    saved = {k: os.environ.get(k) for k in (_FORCE_WEIGHTS_ONLY, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # torch refuses both at once
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_trainer_state(ckpt: Path) -> dict:
    return load(Path(ckpt) / TRAINER_STATE)


def load_module_weights(ckpt: Path) -> dict:
    """Full module weights for evaluation, without DeepSpeed (ZeRO 0-2 keep them whole)."""
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no model states in {ckpt}")
    state = load(files[0])
    module = state.get("module")
    if not module:
        raise ValueError(f"{files[0]} holds no module weights (ZeRO-3 checkpoints need consolidation)")
    return module
