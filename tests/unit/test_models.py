"""The model zoo: every registered preset builds and trains, matches CLIP's published sizes,
and the towers' options (patch dropping, bidirectional text, checkpointing) do what they say."""
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from cluster.cli.main import main
from vlm.models.presets import get_config, list_presets, preset_dict
from vlm.models.registry import build_model, describe
from vlm.models.config import ModelConfig, VisionConfig
from vlm.models.text import TextTransformer

PUBLISHED_PARAMS = {"ViT-B-32": 151.3e6, "ViT-B-16": 149.6e6, "ViT-L-14": 427.6e6, "RN50": 102.0e6}


def random_batch(cfg: ModelConfig, batch: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    size, ctx = cfg.vision.image_size, cfg.text.context_length
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.randint(0, vocab, (batch, ctx), generator=g)
    eot = torch.randint(1, ctx, (batch,), generator=g)
    return images, tokens, eot


@pytest.mark.parametrize("name", list_presets())
def test_preset_forward_backward(name):
    torch.manual_seed(0)
    cfg = get_config(name)
    assert cfg.preset == name
    vocab = cfg.text.vocab_size or 50
    model = build_model(cfg, vocab_size=vocab)
    assert all(p.ndim >= 1 for p in model.parameters()), "DeepSpeed cannot broadcast 0-d parameters"
    batch = 1 if cfg.vision.image_size >= 224 else 3
    images, tokens, eot = random_batch(cfg, batch, vocab)
    out = model(images, tokens, eot)
    e = cfg.embed_dim
    assert out["image_embed"].shape == out["text_embed"].shape == (batch, e)
    assert out["image_pooled"].shape == (batch, model.visual.pooled_dim)
    for key in ("image_embed", "text_embed"):
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(batch), atol=1e-5)
    assert all(torch.isfinite(v).all() for v in out.values())
    loss = -(out["image_embed"] * out["text_embed"]).sum() + out["image_pooled"].pow(2).mean()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_tower_outputs_shapes():
    vit = build_model(get_config("tiny"), vocab_size=50)
    out = vit.visual(torch.randn(2, 3, 32, 32))
    assert out["embed"].shape == (2, 16) and out["pooled"].shape == (2, 32) and out["tokens"].shape == (2, 16, 32)
    text = vit.text(torch.randint(0, 50, (2, 10)), torch.tensor([3, 9]))
    assert text["embed"].shape == (2, 16) and text["tokens"].shape == (2, 10, 32)
    rn = build_model(get_config("tiny-resnet"), vocab_size=50).visual
    out = rn(torch.randn(2, 3, 64, 64))
    assert out["embed"].shape == (2, 16) and out["pooled"].shape == (2, 256) and out["tokens"].shape == (2, 4, 256)
    with pytest.raises(ValueError, match="keep_index"):
        rn(torch.randn(2, 3, 64, 64), keep_index=torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_parameter_totals(name):
    d = describe(name)
    assert d["vocab_size"] == 49408 and d["context_length"] == 77
    assert abs(d["params_total"] / PUBLISHED_PARAMS[name] - 1) < 0.01, d["params_total"]
    assert d["params_total"] == d["params_vision"] + d["params_text"]


def test_describe_flops_count_multiply_add_as_two():
    d = describe("ViT-B-16")
    # ViT-B/16 at 224px is ~17.6 G multiply-adds per image (197 tokens, 12 blocks of width 768).
    assert 34e9 < d["flops_vision"] < 36e9
    assert d["flops_total"] == d["flops_vision"] + d["flops_text"]


def test_vit_keep_index():
    torch.manual_seed(0)
    vit = build_model(get_config("tiny"), vocab_size=50).visual.eval()
    images = torch.randn(2, 3, 32, 32)
    full = vit(images)
    p = vit.num_patches
    # Keeping every patch in order is the unmasked forward.
    kept = vit(images, keep_index=torch.arange(p).expand(2, p))
    for key in ("embed", "pooled", "tokens"):
        assert torch.allclose(kept[key], full[key], atol=1e-5), key
    # Kept tokens carry their original positions: a permutation of all patches permutes
    # the patch tokens and leaves the class token alone.
    perm = torch.stack([torch.randperm(p), torch.randperm(p)])
    shuffled = vit(images, keep_index=perm)
    assert torch.allclose(shuffled["tokens"], torch.gather(full["tokens"], 1, perm[..., None].expand(-1, -1, 32)), atol=1e-5)
    assert torch.allclose(shuffled["embed"], full["embed"], atol=1e-5)
    # Dropping patches: only the kept ones come back, in keep_index order.
    keep = perm[:, :5]
    assert vit(images, keep_index=keep)["tokens"].shape == (2, 5, 32)


@pytest.mark.parametrize("causal", [True, False])
def test_text_bidirectional_mode(causal):
    torch.manual_seed(0)
    text = TextTransformer(vocab_size=50, context_length=12, width=32, depth=2, heads=4, embed_dim=16,
                           causal=causal).eval()
    tokens = torch.randint(0, 49, (1, 12))
    changed = tokens.clone()
    changed[0, 8] += 1
    eot = torch.tensor([11])
    before, after = text(tokens, eot)["tokens"], text(changed, eot)["tokens"]
    earlier_moved = not torch.allclose(before[:, :8], after[:, :8])
    assert earlier_moved == (not causal)
    assert not torch.allclose(before[:, 8:], after[:, 8:])


@pytest.mark.parametrize("name", ["tiny", "tiny-resnet"])
def test_grad_checkpointing_same_gradients(name):
    torch.manual_seed(0)
    cfg = get_config(name)
    plain = build_model(cfg, vocab_size=50)
    with torch.no_grad():  # the zero-initialised last norm of each bottleneck would hide its branch
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    ckpt = build_model(cfg.model_copy(update={"grad_checkpointing": True}), vocab_size=50)
    ckpt.load_state_dict(plain.state_dict())
    batch = random_batch(cfg, 3, 50)
    grads = []
    for model in (plain, ckpt):
        out = model(*batch)
        (-(out["image_embed"] * out["text_embed"]).sum() + out["image_pooled"].pow(2).mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], rtol=1e-4, atol=1e-6), n


def test_tiny_model_trains():
    """The initialisation lets a plain InfoNCE on one batch go down quickly."""
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = build_model(cfg, vocab_size=50)
    batch = random_batch(cfg, 8, 50)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        out = model(*batch)
        logits = 10 * out["image_embed"] @ out["text_embed"].T
        loss = F.cross_entropy(logits, torch.arange(8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_registry_errors_and_config_validation():
    with pytest.raises(KeyError, match="ViT-B-16"):
        preset_dict("ViT-H-99")
    with pytest.raises(ValueError, match="vocabulary"):
        build_model(get_config("tiny"))
    assert isinstance(build_model(get_config("tiny"), 50), torch.nn.Module)
    with pytest.raises(ValidationError):
        VisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ValidationError):
        VisionConfig(type="resnet", image_size=48)
    with pytest.raises(ValidationError):
        ModelConfig(init_temperature=0.07)
    assert get_config("demo").model_dump(exclude={"preset"}) == ModelConfig().model_dump(exclude={"preset"})


def test_cli_model_list_and_info(capsys):
    assert main(["model", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:len(list_presets())]] == list_presets()
    assert main(["model", "info", "ViT-B-16"]) == 0
    out = capsys.readouterr().out
    assert "149.62M" in out and "GFLOPs" in out
    assert main(["model", "info", "tiny", "--vocab-size", "50"]) == 0
    assert "vocabulary 50" in capsys.readouterr().out
    assert main(["model", "info", "ViT-H-99"]) == 1
    assert "RN50" in capsys.readouterr().err
    for argv in (["model"], ["model", "list"], ["model", "info"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0
        assert f"usage: vlm {' '.join(argv)}" in capsys.readouterr().out
