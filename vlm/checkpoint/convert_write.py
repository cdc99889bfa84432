"""Writing converted CLIP weights (vlm.checkpoint.convert.Weights) in each tool's layout.

- vlm: one export file (`vlm ckpt export`'s format), which `vlm eval` and `model.init_from`
  read; its metadata holds a run config for the model and CLIP's tokenizer.
- openclip: a directory with open_clip_model.safetensors and open_clip_config.json, which
  OpenCLIP loads as `create_model("local-dir:DIR")`; the state dict alone also loads
  into a `CLIP(**model_cfg)`.
- hf: a directory in save_pretrained's layout (config.json, model.safetensors,
  preprocessor_config.json), which `CLIPModel.from_pretrained(DIR)` loads.

Each file is written under a temporary name and renamed into place; nothing is written
outside the output path."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vlm.checkpoint import names_hf, names_openclip
from vlm.checkpoint.convert import (CLIP_INIT_SCALE, HF_CONFIG, HF_PREPROCESS, HF_WEIGHTS, KINDS, OPENCLIP_CONFIG,
                                    OPENCLIP_WEIGHTS, Weights)


def write(w: Weights, to: str, output: str | os.PathLike, *, force: bool = False) -> dict:
    """Writes `w` as `to` (vlm, openclip or hf) at `output`; returns a summary."""
    if to not in KINDS:
        raise ValueError(f"unknown target {to!r}; known: {', '.join(KINDS)}")
    output = Path(output)
    notes = list(w.notes)
    if to == "vlm":
        files = _write_vlm(w, output, force, notes)
    else:
        _prepare_dir(output, force)
        files = (_write_openclip if to == "openclip" else _write_hf)(w, output, notes)
    carried = _carried(w, to)
    return {"from": w.kind, "to": to, "output": str(output), "files": [str(f) for f in files],
            "tensors": len(w.towers()) if to != "vlm" else len(w.weights),
            "parameters": sum(v.numel() for v in (w.towers() if to != "vlm" else w.weights).values()),
            "carried": carried, "notes": notes}


def _carried(w: Weights, to: str) -> list[str]:
    out = ["image tower", "text tower", f"activation {w.model.activation}", "image mean/std"]
    if w.logit_scale is not None:
        out.append(f"logit_scale {float(w.logit_scale):.4f}")
    if w.logit_bias is not None and to != "hf":
        out.append(f"logit_bias {float(w.logit_bias):.4f}")
    return out


def _prepare_dir(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; this target writes a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise FileExistsError(f"--output {output} exists and is not empty: pass --force to replace its files")
    output.mkdir(parents=True, exist_ok=True)


def _atomic(path: Path, write_tmp) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_tmp(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _save_json(path: Path, obj: dict) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def _only_towers(w: Weights, notes: list[str], to: str) -> dict[str, torch.Tensor]:
    towers = w.towers()
    rest = sorted({k.split(".")[0] for k in w.weights} - {"visual", "text"})
    if rest:
        notes.append(f"not carried: {', '.join(rest)} (the {to} CLIP has only the two towers)")
    if not w.model.text.causal:
        raise ValueError(f"this model's text tower is bidirectional; the {to} CLIP's is causal")
    return towers


def _scale(w: Weights, notes: list[str]) -> torch.Tensor:
    if w.logit_scale is None:
        notes.append(f"the source carries no temperature: logit_scale set to CLIP's initial {CLIP_INIT_SCALE:.4f}")
        return torch.tensor(CLIP_INIT_SCALE)
    return w.logit_scale.reshape(())


def _clip_tokenizer_notes(w: Weights, notes: list[str]) -> None:
    if w.tokenizer is not None:
        from vlm.data.tokenizer import tokenizer_kind
        from tokenizers import Tokenizer

        if tokenizer_kind(Tokenizer.from_str(w.tokenizer)) != "clip":
            notes.append("this model was trained with its run's own BPE tokenizer, not CLIP's: OpenCLIP and "
                         "Hugging Face tokenize with CLIP's, so its text embeddings will not mean the same there")


def _write_openclip(w: Weights, output: Path, notes: list[str]) -> list[Path]:
    state = names_openclip.to_openclip(_only_towers(w, notes, "OpenCLIP"), w.model)
    state["logit_scale"] = _scale(w, notes)
    if w.logit_bias is not None:
        state["logit_bias"] = w.logit_bias.reshape(())
    _clip_tokenizer_notes(w, notes)
    v = w.model.vision
    config = {"model_cfg": names_openclip.model_cfg_from_ours(w.model),
              "preprocess_cfg": {"mean": list(v.image_mean), "std": list(v.image_std), "size": v.image_size}}
    if w.logit_bias is not None:
        config["model_cfg"]["init_logit_bias"] = float(w.logit_bias)
    return [_save_safetensors(output / OPENCLIP_WEIGHTS, state, {"format": "pt"}),
            _save_json(output / OPENCLIP_CONFIG, config)]


def _write_hf(w: Weights, output: Path, notes: list[str]) -> list[Path]:
    eos = names_hf.CLIP_EOS
    if w.tokenizer is not None:
        from vlm.data.tokenizer import TextEncoder

        eos = TextEncoder.from_json(w.tokenizer, w.model.text.context_length).eot_id
    if eos == 2 != names_hf.CLIP_EOS:
        # transformers' CLIPTextTransformer reads eos_token_id 2 as its legacy marker and
        # pools at each sequence's highest token id instead: the wrong token for this BPE
        raise ValueError("this model's tokenizer ends text with token id 2, which Hugging Face's CLIPModel "
                         "takes as its legacy marker for pooling at the highest token id, not at the end "
                         "token: its text embeddings would be wrong there. Convert a model trained with "
                         "tokenizer.kind: clip, or use --to openclip")
    config = names_hf.config_from_ours(w.model, logit_scale=float(_scale(w, notes)), eos_token_id=eos)
    state = names_hf.to_hf(_only_towers(w, notes, "Hugging Face"))
    state["logit_scale"] = _scale(w, [])
    if w.logit_bias is not None:
        notes.append("not carried: logit_bias (Hugging Face's CLIPModel has none; it is SigLIP's)")
    _clip_tokenizer_notes(w, notes)
    v = w.model.vision
    pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": v.image_size},
           "do_center_crop": True, "crop_size": {"height": v.image_size, "width": v.image_size},
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3,
           "image_mean": list(v.image_mean), "image_std": list(v.image_std)}
    return [_save_safetensors(output / HF_WEIGHTS, state, {"format": "pt"}), _save_json(output / HF_CONFIG, config),
            _save_json(output / HF_PREPROCESS, pre)]


def _write_vlm(w: Weights, output: Path, force: bool, notes: list[str]) -> list[Path]:
    from vlm.checkpoint.export import EXPORT_FORMAT

    if output.suffix != ".safetensors":
        raise ValueError(f"--output must be a .safetensors file for --to vlm, not {output}")
    if output.exists() and not force:
        raise FileExistsError(f"--output {output} exists: pass --force to replace it")
    tree, tokenizer, objectives = _vlm_run(w, notes)
    metadata = {"format": "pt", "vlm_format": EXPORT_FORMAT, "vlm_config": json.dumps(tree),
                "vlm_tokenizer": tokenizer, "vlm_step": "0", "vlm_samples_seen": "",
                "vlm_source": f"{w.kind} weights", "vlm_objectives": json.dumps([o["name"] for o in tree["objectives"]])}
    output.parent.mkdir(parents=True, exist_ok=True)
    return [_save_safetensors(output, {**w.weights, **objectives}, metadata)]


def _vlm_run(w: Weights, notes: list[str]) -> tuple[dict, str, dict[str, torch.Tensor]]:
    """(a run config tree for the model, the tokenizer JSON, the objectives' tensors)."""
    import math

    from vlm.config import RunConfig

    model = w.model.model_dump(mode="json")
    if w.config is not None:  # our own run: keep its config, its objectives' temperature only
        tree = {**w.config, "model": model}
        i = next((i for i, o in enumerate(tree["objectives"]) if o["name"] in ("clip_infonce", "siglip")), None)
        extra = {} if i is None or w.logit_scale is None else {f"objectives.{i}.logit_scale": w.logit_scale}
        if i is not None and w.logit_bias is not None:
            extra[f"objectives.{i}.logit_bias"] = w.logit_bias
        return tree, w.tokenizer, extra
    if w.model.text.vocab_size != 49408:
        raise ValueError(f"a vocabulary of {w.model.text.vocab_size} tokens is not CLIP's 49,408: vlm knows no "
                         "tokenizer for these weights")
    from vlm.data.tokenizer import clip_tokenizer

    scale = w.logit_scale if w.logit_scale is not None else torch.full((1,), CLIP_INIT_SCALE)
    if w.logit_bias is not None:
        objective = {"name": "siglip", "init_temperature": math.exp(-float(scale)), "init_bias": float(w.logit_bias)}
        tensors = {"objectives.0.logit_scale": scale, "objectives.0.logit_bias": w.logit_bias}
    else:
        objective = {"name": "clip_infonce", "init_temperature": max(0.01, math.exp(-float(scale)))}
        tensors = {"objectives.0.logit_scale": scale}
    tree = RunConfig(model=model, tokenizer={"kind": "clip"}, objectives=[objective]).model_dump(mode="json")
    return tree, clip_tokenizer().to_str(), tensors
