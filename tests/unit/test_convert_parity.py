"""`vlm ckpt convert` against the peers' own model code: OpenCLIP's CLIP (its model.py, loaded
from the installed open_clip_torch) and Hugging Face transformers' CLIPModel, random
weights, nothing downloaded.

For each shape (a small ViT, the ViT presets, RN50 and a small ResNet; ViT-B/16 and ViT-L/14
with 3 of their blocks, see DEPTH_CAP), in each direction:
the converted model gives the same L2-normalised image and text embeddings as the source
within 1e-5 in fp32, the temperature (and SigLIP's bias) arrives, and converting back
gives the source's tensors bit for bit. Every parameter and buffer of the source is
perturbed first, so a swapped or transposed tensor cannot hide behind an initialisation of
ones and zeros. The measured differences are printed (pytest -s shows them)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.cli.main import main as vlm_main
from support.openclip import model_module
from vlm.data.tokenizer import TextEncoder, clip_tokenizer
from vlm.eval.load import load_eval_model
from vlm.models.presets import get_config

TOL = 1e-5
CAPTIONS = ["a photo of a red circle", "two dogs on a beach at sunset, très jolie 🐕",
            "x " * 200, "<end_of_text> in the middle"]

# (name, OpenCLIP model_cfg, quick_gelu) — the presets' shapes as OpenCLIP's configs give them
SMALL_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                                             "head_width": 32, "mlp_ratio": 4.0},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
SMALL_RN = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


# ViT-B-32 and RN50 are converted whole; the larger ViTs keep every shape of their tensors
# (widths, heads, patch, image size, vocabulary) with fewer blocks, which only repeat: a
# whole ViT-L/14 costs minutes of the suite's CPU time for no name or layout not seen here
DEPTH_CAP = {"ViT-B-16": 3, "ViT-L-14": 3}


def preset_model_cfg(name: str) -> dict:
    """OpenCLIP's model_cfg for one of our presets (its public configs have these numbers)."""
    c = get_config(name)
    v, t = c.vision, c.text
    cap = DEPTH_CAP.get(name, 10 ** 6)
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": min(t.depth, cap)}
    if v.type == "resnet":
        vision = {"image_size": v.image_size, "layers": list(v.layers), "width": v.width}
    else:
        vision = {"image_size": v.image_size, "layers": min(v.depth, cap), "width": v.width,
                  "patch_size": v.patch_size}
    return {"embed_dim": c.embed_dim, "vision_cfg": vision, "text_cfg": text}


CASES = [("small-vit", SMALL_VIT, False), ("small-vit-quickgelu", SMALL_VIT, True), ("small-resnet", SMALL_RN, False),
         ("ViT-B-32", None, True), ("ViT-B-16", None, False), ("ViT-L-14", None, False), ("RN50", None, False)]


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in module.state_dict(keep_vars=True).values():  # saved state only: not OpenCLIP's mask buffer
        if t.is_floating_point():
            t.data.add_(0.02 * torch.randn(t.shape, generator=g))
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.abs_().add_(0.5)


def openclip_model(model_cfg: dict, quick_gelu: bool, *, logit_bias: float | None = None):
    oc = model_module()
    cfg = {k: v for k, v in model_cfg.items() if k != "init_logit_bias"}
    kw = {"init_logit_bias": logit_bias} if logit_bias is not None else {}
    return oc.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=oc.CLIPVisionCfg(**cfg["vision_cfg"]),
                   text_cfg=oc.CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=quick_gelu, **kw).eval()


def inputs(image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.randn(len(CAPTIONS), 3, image_size, image_size, generator=torch.Generator().manual_seed(3))
    tokens, eot = TextEncoder(clip_tokenizer(), 77)(CAPTIONS)
    return images, tokens, eot


@torch.no_grad()
def max_diffs(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    return tuple(float((x - y).abs().max()) for x, y in zip(a, b))


@torch.no_grad()
def ours(model, images, tokens, eot):
    return model.encode_image(images), model.encode_text(tokens, eot)


@torch.no_grad()
def theirs_openclip(model, images, tokens):
    return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def convert(src, to: str, out, *extra: str) -> None:
    assert vlm_main(["ckpt", "convert", str(src), "--to", to, "--output", str(out), *extra]) == 0


def report(name: str, direction: str, diffs: tuple[float, float]) -> None:
    print(f"\nparity {name:<20} {direction:<16} image max|diff| {diffs[0]:.2e}  text max|diff| {diffs[1]:.2e}")
    assert max(diffs) < TOL, (name, direction, diffs)


@pytest.mark.parametrize("name,model_cfg,quick_gelu", CASES, ids=[c[0] for c in CASES])
def test_openclip_both_ways(tmp_path, name, model_cfg, quick_gelu):
    model_cfg = model_cfg or preset_model_cfg(name)
    torch.manual_seed(0)
    src = openclip_model(model_cfg, quick_gelu)
    perturb(src, 1)
    src_dir = tmp_path / "openclip"
    src_dir.mkdir()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(src_dir / "open_clip_model.safetensors"))
    (src_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**model_cfg, "quick_gelu": quick_gelu}}))

    convert(src_dir, "vlm", tmp_path / "vlm.safetensors")
    model, _, cfg = load_eval_model(str(tmp_path / "vlm.safetensors"))
    assert cfg.model.activation == ("quick_gelu" if quick_gelu else "gelu")
    assert cfg.tokenizer.kind == "clip" and cfg.objectives[0].name == "clip_infonce"
    exported = load_file(str(tmp_path / "vlm.safetensors"))
    assert torch.equal(exported["objectives.0.logit_scale"], src.logit_scale.detach().reshape(1))
    images, tokens, eot = inputs(cfg.model.vision.image_size)
    report(name, "openclip -> vlm", max_diffs(ours(model, images, tokens, eot), theirs_openclip(src, images, tokens)))

    convert(tmp_path / "vlm.safetensors", "openclip", tmp_path / "back")
    back = openclip_model(model_cfg, quick_gelu)
    back.load_state_dict(load_file(str(tmp_path / "back" / "open_clip_model.safetensors")), strict=True)
    report(name, "vlm -> openclip", max_diffs(theirs_openclip(back.eval(), images, tokens), ours(model, images, tokens, eot)))
    for key, tensor in src.state_dict().items():  # the round trip is exact
        assert torch.equal(back.state_dict()[key], tensor), key


def hf_clip(model_cfg: dict, quick_gelu: bool):
    from transformers import CLIPConfig, CLIPModel

    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if quick_gelu else "gelu"
    config = CLIPConfig(
        projection_dim=model_cfg["embed_dim"],
        text_config={"vocab_size": t["vocab_size"], "hidden_size": t["width"], "intermediate_size": 4 * t["width"],
                     "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
                     "max_position_embeddings": t["context_length"], "hidden_act": act,
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
        vision_config={"hidden_size": v["width"], "intermediate_size": 4 * v["width"],
                       "num_hidden_layers": v["layers"], "num_attention_heads": v["width"] // v.get("head_width", 64),
                       "image_size": v["image_size"], "patch_size": v["patch_size"], "hidden_act": act})
    return CLIPModel(config).eval()


@torch.no_grad()
def theirs_hf(model, images, tokens):
    image = model.get_image_features(pixel_values=images).pooler_output
    text = model.get_text_features(input_ids=tokens).pooler_output
    return torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)


HF_CASES = [c for c in CASES if "resnet" not in c[0] and c[0] != "RN50"]


@pytest.mark.parametrize("name,model_cfg,quick_gelu", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_huggingface_both_ways(tmp_path, name, model_cfg, quick_gelu):
    from transformers import CLIPModel

    model_cfg = model_cfg or preset_model_cfg(name)
    torch.manual_seed(0)
    src = hf_clip(model_cfg, quick_gelu)
    perturb(src, 2)
    src.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", "vlm", tmp_path / "vlm.safetensors")
    model, _, cfg = load_eval_model(str(tmp_path / "vlm.safetensors"))
    assert math.isclose(float(load_file(str(tmp_path / "vlm.safetensors"))["objectives.0.logit_scale"]),
                        float(src.logit_scale.detach()))
    images, tokens, eot = inputs(cfg.model.vision.image_size)
    report(name, "hf -> vlm", max_diffs(ours(model, images, tokens, eot), theirs_hf(src, images, tokens)))

    convert(tmp_path / "vlm.safetensors", "hf", tmp_path / "back")
    back = CLIPModel.from_pretrained(tmp_path / "back").eval()
    report(name, "vlm -> hf", max_diffs(theirs_hf(back, images, tokens), ours(model, images, tokens, eot)))
    for key, tensor in src.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_siglip_bias_and_refusals(tmp_path, capsys):
    """A SigLIP model's bias travels openclip -> vlm -> openclip; Hugging Face's CLIPModel has
    neither a ResNet tower nor a bias, which the conversion says instead of guessing."""
    src = openclip_model(SMALL_VIT, False, logit_bias=-7.5)
    perturb(src, 4)
    torch.save(src.state_dict(), tmp_path / "siglip.pt")  # a bare state dict: heads are inferred
    convert(tmp_path / "siglip.pt", "vlm", tmp_path / "s.safetensors")
    model, _, cfg = load_eval_model(str(tmp_path / "s.safetensors"))
    assert cfg.objectives[0].name == "siglip"
    assert float(load_file(str(tmp_path / "s.safetensors"))["objectives.0.logit_bias"]) == float(src.logit_bias.detach())
    assert "heads inferred" in capsys.readouterr().out
    convert(tmp_path / "s.safetensors", "hf", tmp_path / "hf")
    assert "not carried: logit_bias" in capsys.readouterr().out

    rn = openclip_model(SMALL_RN, False)
    torch.save(rn.state_dict(), tmp_path / "rn.pt")
    convert(tmp_path / "rn.pt", "vlm", tmp_path / "rn.safetensors")
    assert vlm_main(["ckpt", "convert", str(tmp_path / "rn.safetensors"), "--to", "hf",
                     "--output", str(tmp_path / "rn-hf")]) == 1
    assert "no ResNet image tower" in capsys.readouterr().err
    assert vlm_main(["ckpt", "convert", str(tmp_path / "rn.pt"), "--to", "vlm",
                     "--output", str(tmp_path / "rn.safetensors")]) == 1
    assert "exists: pass --force" in capsys.readouterr().err


def test_sharded_huggingface_directory(tmp_path):
    """A large model's save_pretrained writes shards and an index: they are read as one."""
    src = hf_clip(SMALL_VIT, False)
    perturb(src, 6)
    src.save_pretrained(tmp_path / "hf", max_shard_size="5MB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    convert(tmp_path / "hf", "vlm", tmp_path / "vlm.safetensors")
    model, _, _ = load_eval_model(str(tmp_path / "vlm.safetensors"))
    images, tokens, eot = inputs(32)
    report("small-vit sharded", "hf -> vlm", max_diffs(ours(model, images, tokens, eot), theirs_hf(src, images, tokens)))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_code_is_refused_unrun(tmp_path, capsys):
    """Someone else's .pt that needs a global beyond tensors and plain data is refused, and
    what it would run never runs."""
    marker = tmp_path / "ran"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, tmp_path / "evil.pt")
    assert vlm_main(["ckpt", "convert", str(tmp_path / "evil.pt"), "--to", "vlm",
                     "--output", str(tmp_path / "out.safetensors")]) == 1
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_a_model_of_the_runs_own_bpe_is_refused_for_hugging_face(tmp_path):
    """Our BPE ends text with id 2, which CLIPModel reads as 'pool at the highest id': the
    conversion refuses instead of writing a text tower that pools the wrong token."""
    import dataclasses

    from vlm.checkpoint.convert import read
    from vlm.checkpoint.convert_write import write
    from vlm.data.tokenizer import train_tokenizer

    torch.save(openclip_model(SMALL_VIT, False).state_dict(), tmp_path / "m.pt")
    convert(tmp_path / "m.pt", "vlm", tmp_path / "m.safetensors")
    w = read(tmp_path / "m.safetensors")
    bpe = train_tokenizer([f"a photo of thing {i}" for i in range(200)], vocab_size=300)
    assert TextEncoder.from_json(bpe.to_str(), 77).eot_id == 2
    with pytest.raises(ValueError, match="legacy marker"):
        write(dataclasses.replace(w, tokenizer=bpe.to_str()), "hf", tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
