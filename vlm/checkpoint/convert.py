"""`vlm ckpt convert`: CLIP weights between this project, OpenCLIP and Hugging Face.

Every format is read into one neutral form, `Weights` (our CLIP tensor names, our
ModelConfig, the temperature and SigLIP bias, and for our own files the tokenizer and run
config), and written from it, so each direction is one reader and one writer. The name
tables live in names_openclip and names_hf. Weights are read without running any pickled
code (safetensors, or torch.load with weights_only through vlm.checkpoint.safeload), and
the output is written beside itself under a temporary name and renamed into place.

    w = read("openclip_dir/")            # the kind is detected, or say read(path, "hf")
    write(w, "vlm", "model.safetensors")  # `vlm eval --checkpoint model.safetensors`
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm.checkpoint import names_hf, names_openclip
from vlm.models.config import ModelConfig

KINDS = ("vlm", "openclip", "hf")
OPENCLIP_CONFIG, OPENCLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
OPENCLIP_FILES = (OPENCLIP_WEIGHTS, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                  "open_clip_pytorch_model.pth")
HF_CONFIG, HF_WEIGHTS, HF_PREPROCESS = "config.json", "model.safetensors", "preprocessor_config.json"
CLIP_INIT_SCALE = math.log(1 / 0.07)  # CLIP's initial log(1/T), for a source that carries none


@dataclass
class Weights:
    weights: dict[str, torch.Tensor]  # our CLIP model's tensors (towers, and fusion/decoder for vlm sources)
    model: ModelConfig
    kind: str  # where they came from: vlm, openclip or hf
    logit_scale: torch.Tensor | None = None  # [1]: log(1/T) (InfoNCE) or log t (SigLIP)
    logit_bias: torch.Tensor | None = None  # [1]: SigLIP's bias
    tokenizer: str | None = None  # a vlm source's tokenizer JSON
    config: dict | None = None  # a vlm source's run config tree
    notes: list[str] = field(default_factory=list)  # what was not carried, and why

    def towers(self) -> dict[str, torch.Tensor]:
        """The image and text towers only (what OpenCLIP's and Hugging Face's CLIP hold)."""
        return {k: v for k, v in self.weights.items() if k.startswith(("visual.", "text."))}


# -- reading ----------------------------------------------------------------------------


def detect(path: str | os.PathLike) -> str:
    """Which kind of weights `path` holds, from its files (never from its contents' code)."""
    p = Path(path)
    if p.is_dir():
        if (p / OPENCLIP_CONFIG).is_file() or any((p / f).is_file() for f in OPENCLIP_FILES):
            return "openclip"
        if (p / HF_CONFIG).is_file():
            return "hf"
        if (p / "checkpoints").is_dir() or (p / "manifest.json").is_file() or (p / "trainer_state.pt").is_file():
            return "vlm"
        raise ValueError(f"{p} holds neither an OpenCLIP model ({OPENCLIP_CONFIG}), a Hugging Face CLIPModel "
                         f"({HF_CONFIG}) nor a vlm run or checkpoint")
    if not p.is_file():
        raise FileNotFoundError(f"no such file or directory: {p}")
    if p.suffix == ".safetensors":  # the header says it all: no tensor is read twice
        from safetensors import safe_open

        if "vlm_format" in _safetensors_metadata(p):
            return "vlm"
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
    else:
        keys = _load_state(p).keys()
    if any(k.startswith("vision_model.") for k in keys):
        return "hf"
    return "openclip"


def _safetensors_metadata(p: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{p} is not a readable safetensors file: {e}") from None


def _load_state(p: Path) -> dict[str, torch.Tensor]:
    """A state dict file: safetensors, or a torch pickle read as tensors and plain data only.
    A training checkpoint's {"state_dict": ...} is unwrapped and DDP's `module.` dropped."""
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        _safetensors_metadata(p)
        state = load_file(str(p))
    else:
        from vlm.checkpoint.safeload import load

        state = load(p)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{p} is not a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read(path: str | os.PathLike, kind: str | None = None, *, activation: str | None = None) -> Weights:
    """Weights from `path` (kind detected when None). activation: the source's MLP
    activation where its files cannot say (an OpenCLIP state dict without its config)."""
    kind = kind or detect(path)
    if kind not in KINDS:
        raise ValueError(f"unknown weights kind {kind!r}; known: {', '.join(KINDS)}")
    w = {"vlm": _read_vlm, "openclip": _read_openclip, "hf": _read_hf}[kind](Path(path))
    if activation is not None:
        w.model = w.model.model_copy(update={"activation": activation})
    check_shapes(w.weights, w.model, str(path))
    return w


def check_shapes(weights: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    """Every tensor has the shape a model of `cfg` gives it (a config that does not fit the
    weights fails here, naming the tensor, not deep inside load_state_dict)."""
    from vlm.models.registry import build_model

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    bad = [f"{k} {tuple(v.shape)} (the config gives {shapes[k]})" for k, v in weights.items()
           if k in shapes and tuple(v.shape) != shapes[k]]
    if bad:
        raise ValueError(f"{where}: {len(bad)} tensor(s) do not fit the model config: {'; '.join(bad[:3])}")


def _read_openclip(p: Path) -> Weights:
    folder = p if p.is_dir() else p.parent
    if p.is_dir():
        found = [folder / f for f in OPENCLIP_FILES if (folder / f).is_file()]
        if not found:
            raise FileNotFoundError(f"{p} has none of OpenCLIP's weight files ({', '.join(OPENCLIP_FILES)})")
        p = found[0]
    state = _load_state(p)
    config = json.loads((folder / OPENCLIP_CONFIG).read_text()) if (folder / OPENCLIP_CONFIG).is_file() else {}
    model_cfg = config.get("model_cfg") or names_openclip.infer_model_cfg(state)
    model = names_openclip.model_cfg_to_ours(model_cfg)
    pre = config.get("preprocess_cfg") or {}
    if "mean" in pre and "std" in pre:
        model = model.model_copy(update={"vision": model.vision.model_copy(
            update={"image_mean": tuple(pre["mean"]), "image_std": tuple(pre["std"])})})
    w = Weights(names_openclip.from_openclip(state, model), model, "openclip",
                logit_scale=_scalar(state.get("logit_scale")), logit_bias=_scalar(state.get("logit_bias")))
    if not config:
        w.notes.append(f"no {OPENCLIP_CONFIG} beside the weights: heads inferred as width/64, activation "
                       f"{model.activation} (pass --activation quick_gelu for OpenAI's weights)")
    return w


def _read_hf(p: Path) -> Weights:
    folder = p if p.is_dir() else p.parent
    if not (folder / HF_CONFIG).is_file():
        raise FileNotFoundError(f"{folder} has no {HF_CONFIG}: a Hugging Face CLIPModel is a directory "
                                "(save_pretrained's layout)")
    model = names_hf.config_to_ours(json.loads((folder / HF_CONFIG).read_text()))
    if (folder / HF_PREPROCESS).is_file():
        pre = json.loads((folder / HF_PREPROCESS).read_text())
        if "image_mean" in pre and "image_std" in pre:
            model = model.model_copy(update={"vision": model.vision.model_copy(
                update={"image_mean": tuple(pre["image_mean"]), "image_std": tuple(pre["image_std"])})})
    state = _hf_state(p)
    return Weights(names_hf.from_hf(state, model), model, "hf", logit_scale=_scalar(state.get("logit_scale")))


def _hf_state(p: Path) -> dict[str, torch.Tensor]:
    """save_pretrained's weights: one file, or shards listed by an index (large models)."""
    if not p.is_dir():
        return _load_state(p)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (p / index).is_file():
            shards = sorted(set(json.loads((p / index).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in _load_state(_inside(p, shard)).items()}
    found = [p / f for f in (HF_WEIGHTS, "pytorch_model.bin") if (p / f).is_file()]
    if not found:
        raise FileNotFoundError(f"{p} has neither {HF_WEIGHTS}, pytorch_model.bin nor a sharded index")
    return _load_state(found[0])


def _inside(folder: Path, name: str) -> Path:
    """A file an index names, refused when the name leaves the folder (an untrusted index)."""
    path = (folder / name).resolve()
    if path.parent != folder.resolve():
        raise ValueError(f"{folder}: the index names {name!r}, which is not a file of that directory")
    return path


def _scalar(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().reshape(1).float().clone()


def _read_vlm(p: Path) -> Weights:
    from vlm.checkpoint.export import consolidated_state, load_export, split_pretrainer_state
    from vlm.config import config_from_dict

    if p.is_file():
        tensors, meta = load_export(p)
        tree, tokenizer = json.loads(meta["vlm_config"]), meta["vlm_tokenizer"]
        model_w = {k: v for k, v in tensors.items() if not k.startswith("objectives.")}
        objectives = {k: v for k, v in tensors.items() if k.startswith("objectives.")}
    else:
        from vlm.checkpoint.resolve import resolve
        from vlm.checkpoint.safeload import load_trainer_state

        ckpt = resolve(str(p), verify_files=True)
        state = load_trainer_state(ckpt)
        tree, tokenizer = state["config"], state["tokenizer"]
        model_w, objectives = split_pretrainer_state(consolidated_state(ckpt, state))
    cfg = config_from_dict(tree)
    model = cfg.model.model_copy(update={"init_from": None})
    if model.text.vocab_size is None:
        from vlm.data.tokenizer import TextEncoder

        vocab = TextEncoder.from_json(tokenizer, model.text.context_length).vocab_size
        model = model.model_copy(update={"text": model.text.model_copy(update={"vocab_size": vocab})})
    w = Weights(model_w, model, "vlm", tokenizer=tokenizer, config=tree)
    for i, o in enumerate(cfg.objectives):
        if o.name in ("clip_infonce", "siglip") and f"objectives.{i}.logit_scale" in objectives:
            w.logit_scale = objectives[f"objectives.{i}.logit_scale"].reshape(1).clone()
            w.logit_bias = _scalar(objectives.get(f"objectives.{i}.logit_bias"))
            break
    return w
