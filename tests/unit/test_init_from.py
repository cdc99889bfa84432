"""`model.init_from`: a training run starts from OpenCLIP weights (OpenCLIP's own model code,
random weights) with CLIP's tokenizer and the source's temperature, and its first checkpoint
still gives the source's embeddings (the learning rate is too small to move them); a
config that does not fit the weights is refused, showing the source's model config; and a
vlm export starts a run with the tokenizer it was trained with."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from cluster.cli.main import main as vlm_main
from support.openclip import model_module
from support.engine import engine
from support.shardgen import write_shards
from test_convert_parity import inputs, max_diffs, ours, perturb, theirs_openclip
from vlm.config import load_config
from vlm.data.tokenizer import TOKENIZER_FILE, clip_tokenizer, prepare_tokenizer
from vlm.eval.load import load_eval_model

# OpenCLIP's shape of the tiny model below (mlp_ratio 2, 16-wide heads)
MODEL_CFG = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
                            "mlp_ratio": 2.0},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                          "mlp_ratio": 2.0}}
MODEL = {"embed_dim": 32, "activation": "quick_gelu",
         "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0},
         "text": {"context_length": 77, "vocab_size": 49408, "width": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0}}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An OpenCLIP model directory (weights + open_clip_config.json) and the model itself."""
    oc = model_module()
    torch.manual_seed(0)
    model = oc.CLIP(embed_dim=32, vision_cfg=oc.CLIPVisionCfg(**MODEL_CFG["vision_cfg"]),
                    text_cfg=oc.CLIPTextCfg(**MODEL_CFG["text_cfg"]), quick_gelu=True).eval()
    perturb(model, 5)
    with torch.no_grad():
        model.logit_scale.fill_(3.25)
    d = tmp_path_factory.mktemp("openclip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    return d, model


def run_config(tmp_path: Path, shards: Path, model: dict, init_from: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "name": "init", "run_dir": str(tmp_path / "run"), "data": {"train_shards": str(shards)},
        "model": {**model, "init_from": init_from}, "optim": {"lr": 1e-10, "warmup_steps": 0},
        "train": {"num_workers": 1, "micro_batch_size": 8, "steps": 1, "checkpoint_every": 1, "log_every": 1},
        "metrics": {"enabled": False}, "eval": {"every_steps": 0}}))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus") / "train"
    write_shards(d, n=16, per_shard=16)
    return d


def test_a_run_starts_from_openclip_weights(tmp_path, source, shards):
    src_dir, src = source
    config = run_config(tmp_path, shards, MODEL, f"openclip:{src_dir}")
    cfg = load_config(config)
    assert cfg.tokenizer.kind == "clip"  # imported weights tokenize with CLIP's ids by default
    prepare_tokenizer(cfg)
    out = engine(config)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"model.init_from: 37 tensors from openclip weights {src_dir}" in out.stdout
    assert "objective clip_infonce starts at logit scale 3.2500" in out.stdout

    export = tmp_path / "step1.safetensors"
    assert vlm_main(["ckpt", "export", str(tmp_path / "run"), "--output", str(export)]) == 0
    model, _, _ = load_eval_model(str(export))
    images, tokens, eot = inputs(32)
    diffs = max_diffs(ours(model, images, tokens, eot), theirs_openclip(src, images, tokens))
    assert max(diffs) < 1e-5, diffs
    from safetensors.torch import load_file

    assert abs(float(load_file(str(export))["objectives.0.logit_scale"]) - 3.25) < 1e-6


def test_a_config_that_does_not_fit_is_refused(tmp_path, source, shards):
    src_dir, _ = source
    wrong = {**MODEL, "text": {**MODEL["text"], "width": 64}, "activation": "gelu"}
    config = run_config(tmp_path, shards, wrong, f"openclip:{src_dir}")
    prepare_tokenizer(load_config(config))
    out = engine(config)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "does not fit model" in text and "activation quick_gelu (the config has gelu)" in text
    assert "text.token_embed.weight (49408, 32) vs (49408, 64)" in text
    assert "The source's model is:" in text and "width: 32" in text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_vlm_export_brings_its_tokenizer(tmp_path, source):
    """init_from vlm:EXPORT copies the export's tokenizer into the new run (a run-trained BPE
    is never trained anew on other captions: its ids would not match the weights)."""
    src_dir, _ = source
    export = tmp_path / "clip.safetensors"
    assert vlm_main(["ckpt", "convert", str(src_dir), "--to", "vlm", "--output", str(export)]) == 0
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.init_from=vlm:{export}",
                             "tokenizer.kind=clip"])
    prepare_tokenizer(cfg)
    assert (tmp_path / "run" / TOKENIZER_FILE).is_file()
    assert (tmp_path / "run" / TOKENIZER_FILE).read_text() == clip_tokenizer().to_str()
    bpe = load_config(None, [f"run_dir={tmp_path / 'run2'}", f"model.init_from=vlm:{export}"])
    with pytest.raises(ValueError, match="was trained with a clip tokenizer: set tokenizer.kind: clip"):
        prepare_tokenizer(bpe)  # the export's tokenizer is CLIP's: the kind must say so
    assert not (tmp_path / "run2").exists()  # refused before anything was written
