"""Consolidated fp32 weights from a training checkpoint, and the single-file export that
`vlm eval` (and anything that reads safetensors) loads without DeepSpeed.

A checkpoint holds the Pretrainer (the CLIP model plus the objectives' own parameters) in
DeepSpeed's layout: under ZeRO-0 the whole module sits in mp_rank_00_model_states.pt;
under ZeRO-1/2 the fp32 master weights are partitioned across the ranks' optimizer files;
under ZeRO-3 the parameters themselves are, and the model-state files hold empty
placeholders. DeepSpeed's own zero_to_fp32 utilities stitch stages 1-3 back together
offline (no process group), so we use those rather than reading its private layout.

The export (`export_safetensors`) is one safetensors file: the CLIP model's tensors under
their own names (what `build_model(cfg.model, vocab).load_state_dict` takes), the
objectives' parameters under `objectives.{i}.` (i = position in the config's objectives),
all fp32. Everything needed to rebuild the model is in the file's metadata (text only,
so JSON strings): `vlm_config` (the resolved run config), `vlm_tokenizer` (the tokenizer
JSON), `vlm_objectives`, `vlm_step`, `vlm_samples_seen`, `vlm_source`. Metadata rather
than a sidecar file, so the weights and what they mean can never be separated or go
stale against each other."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

from vlm.checkpoint.safeload import check_files, load_module_weights, load_trainer_state, weights_only_loads
from vlm.train.module import MODEL_PREFIX

EXPORT_FORMAT = "vlm-clip-export/1"
OBJECTIVE_PREFIX = "objectives."


def zero_stage(trainer_state: dict) -> int:
    """The ZeRO stage the checkpoint was written under."""
    if "zero_stage" in trainer_state:
        return int(trainer_state["zero_stage"])
    return int(trainer_state["config"]["train"]["zero_stage"])


def _zero_to_fp32(ckpt: Path) -> dict[str, torch.Tensor]:
    if "deepspeed" not in sys.modules:  # an offline tool: no accelerator needed
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # it unpickles every model and optimizer file itself (weights_only=False): each is
    # proved safe first, and its own loads are forced to weights_only too
    check_files(ckpt)
    # it reports progress on stdout and stderr, which belong to our commands' output
    # (--json); shown only when it fails
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    except Exception:
        sys.stderr.write(chatter.getvalue())
        raise


def _zero0_module(ckpt: Path) -> dict[str, torch.Tensor]:
    module = load_module_weights(ckpt)
    low = sorted(k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32)
    if low:
        print(f"warning: {ckpt} holds {module[low[0]].dtype} weights ({low[0]}, ...); they are upcast to fp32 "
              f"(a ZeRO-0 checkpoint keeps no separate fp32 master copy that we consolidate)", file=sys.stderr)
    return module


def consolidated_state(ckpt: Path, trainer_state: dict | None = None) -> dict[str, torch.Tensor]:
    """The whole Pretrainer state dict (keys model.*, objectives.*), fp32, on the CPU,
    for any ZeRO stage."""
    state = trainer_state if trainer_state is not None else load_trainer_state(ckpt)
    stage = zero_stage(state)
    try:
        tensors = _zero0_module(ckpt) if stage == 0 else _zero_to_fp32(ckpt)
    except (FileNotFoundError, KeyError, RuntimeError) as e:
        raise ValueError(f"cannot consolidate the ZeRO-{stage} weights of {ckpt}: {e}") from None
    # clone: tied parameters come back as one shared tensor, which safetensors refuses
    return {k: (v.float() if v.is_floating_point() else v).detach().clone().contiguous()
            for k, v in tensors.items()}


def split_pretrainer_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Pretrainer keys -> (the CLIP model's own state dict, the objectives' under `objectives.`)."""
    model = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    objectives = {k: v for k, v in state.items() if k.startswith(OBJECTIVE_PREFIX)}
    other = sorted(set(state) - {MODEL_PREFIX + k for k in model} - set(objectives))
    if other:
        raise ValueError(f"unexpected tensors outside model.* and objectives.*: {other[:5]}")
    if not model:
        raise ValueError("the checkpoint holds no model.* tensors")
    return model, objectives


def export_safetensors(ckpt: Path, output: Path) -> dict:
    """Writes the export atomically (a temporary file renamed into place); returns a summary."""
    from safetensors.torch import save_file

    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"--output must be a .safetensors file, not {output}")
    state = load_trainer_state(ckpt)
    model, objectives = split_pretrainer_state(consolidated_state(ckpt, state))
    tensors = {**model, **objectives}
    metadata = {
        "format": "pt", "vlm_format": EXPORT_FORMAT, "vlm_config": json.dumps(state["config"]),
        "vlm_tokenizer": state["tokenizer"], "vlm_step": str(state["step"]),
        "vlm_samples_seen": str(state.get("samples_seen", "")), "vlm_source": str(ckpt),
        "vlm_objectives": json.dumps([o["name"] for o in state["config"]["objectives"]]),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return {"checkpoint": str(ckpt), "output": str(output), "step": state["step"], "tensors": len(tensors),
            "parameters": sum(v.numel() for v in tensors.values()),
            "model_parameters": sum(v.numel() for v in model.values()), "bytes": output.stat().st_size,
            "zero_stage": zero_stage(state)}


def load_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An export -> (its tensors, its metadata). Clear errors for anything else."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"export not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    missing = [k for k in ("vlm_config", "vlm_tokenizer") if k not in metadata]
    if metadata.get("vlm_format") != EXPORT_FORMAT or missing:
        raise ValueError(f"{path} is not a vlm export (format {metadata.get('vlm_format')!r}, missing "
                         f"{missing or 'nothing'}): write one with `vlm ckpt export`")
    return tensors, metadata
