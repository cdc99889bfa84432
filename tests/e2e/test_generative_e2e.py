"""End to end for the generative and alignment objectives: a short training run in which
image-text matching learns past the base rate; `vlm train` with contrastive + captioning +
matching (DeepSpeed on a Ray Train worker), then `vlm caption` and `vlm eval-generative`
on the checkpoint; the box task on a region-word model; bad inputs."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cluster.cli.main import main
from demo.corpus import make_caption, regions_of, render_image, train_pairs
from vlm.eval.generative import Sample, box_zeroshot_task, load_pretrainer, names_label
from vlm.models.config import ModelConfig
from vlm.models.registry import build_model
from vlm.objectives.configs import ClipInfoNCEConfig, ITMConfig, RegionWordConfig
from vlm.objectives.itm import BASE_RATE_LOSS
from vlm.objectives.registry import build_objective
from vlm.train.module import Pretrainer
from vlm.data.tokenizer import TextEncoder, train_tokenizer

torch.set_num_threads(1)
VLM = str(Path(sys.executable).parent / "vlm")
REPO = Path(__file__).resolve().parents[2]


def rendered(colour: str, shape: str, n: int, rng, size: int = 16) -> torch.Tensor:
    imgs = [torch.from_numpy(render_image(rng, colour, shape, size)[0]).permute(2, 0, 1).float() / 127.5 - 1
            for _ in range(n)]
    return torch.stack(imgs)


def test_itm_training_learns_past_the_base_rate():
    """Eight classes, one of each per batch, captions [<sot> word <eot>]: hard negatives are
    always of another class, so a head that reads the pair beats H(1/3) = 0.6365."""
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "red", "blue"]
    shapes = ["circle"] * 6 + ["square"] * 2
    pool = [rendered(c, s, 12, rng) for c, s in zip(colours, shapes)]
    tokens = torch.zeros(8, 6, dtype=torch.long)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 1, torch.arange(3, 11), 2
    eot = torch.full((8,), 2)
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=16, vision={"image_size": 16, "patch_size": 4, "width": 32, "depth": 1, "heads": 2},
                      text={"context_length": 6, "width": 32, "depth": 1, "heads": 2},
                      fusion={"width": 32, "depth": 2, "heads": 2})
    model = build_model(cfg, vocab_size=12)
    objectives = [build_objective(c, embed_dim=16, vision_width=32, model=model, vocab_size=12)
                  for c in (ClipInfoNCEConfig(), ITMConfig())]
    pretrainer = Pretrainer(model, objectives, [1.0, 1.0])
    opt = torch.optim.AdamW(pretrainer.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(600):
        pick = torch.randint(12, (8,), generator=g)
        out = pretrainer({"images": torch.stack([pool[k][pick[k]] for k in range(8)]), "tokens": tokens,
                          "eot_index": eot})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append(out["itm"].item())
    assert abs(history[0] - np.log(2)) < 0.05
    # The run is chaotic: other rounding (another instruction set or CPU) gives another run, as
    # another seed does, so lr and steps are chosen on the spread of the last-40 mean over
    # seeds 0-9 x ATEN_CPU_CAPABILITY default, avx2, avx512 (30 runs, step 600, lr 1e-3):
    # 0.102-0.475, seed 0 0.255/0.221/0.188. The former lr 3e-3 at step 400 gave 0.458-0.637
    # (seeds 0-4), on both sides of the bar. A head that does not read the pair (fusion output
    # zeroed or detached, or the fusion shown only the image or only the text) stays at
    # 0.630-0.643 at step 600 (seeds 0-4), so it fails.
    assert np.mean(history[-40:]) < BASE_RATE_LOSS - 0.05, np.mean(history[-40:])


def write_shards(out: Path, n: int, seed: int, size: int = 32) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = train_pairs()
    with wds.TarWriter(str(out / "00000.tar")) as w:
        for i in range(n):
            colour, shape = pairs[int(rng.integers(len(pairs)))]
            pixels, bbox, tone = render_image(rng, colour, shape, 64)
            text, _ = make_caption(rng, colour, shape, bbox, 64, tone)
            buf = io.BytesIO()
            Image.fromarray(pixels).resize((size, size)).save(buf, format="PNG")
            w.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": text,
                     "json": {"colour": colour, "shape": shape, "label": f"{colour} {shape}",
                              "regions": regions_of(bbox, colour, shape, 64)}})
    (out / "00000_stats.json").write_text(json.dumps({"success": n}))


TINY = ["model.embed_dim=32", "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
        "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "tokenizer.vocab_size=300",
        "model.decoder.depth=1", "model.decoder.heads=2", "model.fusion.width=32", "model.fusion.depth=1",
        "model.fusion.heads=2", "train.micro_batch_size=16", "train.num_workers=1", "train.steps=6",
        "train.checkpoint_every=100", "train.log_every=2", "metrics.enabled=false", "name=gen-e2e"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    write_shards(root / "train", 160, seed=0)
    write_shards(root / "heldout", 24, seed=1)
    config = root / "run.yaml"
    config.write_text(f"""
run_dir: {root / 'run'}
data: {{train_shards: {root / 'train'}, eval_shards: {root / 'heldout'}, colour_augment: {{greyscale: 0.5}}}}
model: {{decoder: {{}}, fusion: {{}}}}
objectives:
  - {{name: clip_infonce}}
  - {{name: itg, weight: 2.0}}
  - {{name: itm}}
""")
    args = [VLM, "train", "--config", str(config)] + [a for o in TINY for a in ("--set", o)]
    proc = subprocess.run(args, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.mark.e2e
def test_caption_and_eval_generative_cli_on_a_trained_run(trained, capsys, tmp_path):
    log = [json.loads(line) for line in (trained / "run" / "train_log.jsonl").read_text().splitlines()]
    assert {"loss/itg", "loss/itm", "loss/clip_infonce"} <= set(log[-1])
    # the greyscale augmentation's word is one token of the run's tokenizer
    tok = TextEncoder.from_json((trained / "run" / "tokenizer.json").read_text(), 12).tokenizer
    assert len(tok.encode("a grey", add_special_tokens=False).ids) == 2
    out_json = tmp_path / "cap.json"
    assert main(["caption", "--checkpoint", str(trained / "run"), "--beam", "2", "--limit", "6",
                 "--output", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "names colour and shape" in printed
    result = json.loads(out_json.read_text())["caption"]
    assert result["num_images"] == 6 and len(result["examples"]) == 6
    assert all(isinstance(e["caption"], str) for e in result["examples"])
    assert main(["eval-generative", "--checkpoint", str(trained / "run"), "--top-k", "4"]) == 0
    printed = capsys.readouterr().out
    assert "ITM re-ranking of the top 4" in printed and "names colour and shape" in printed
    # the region task needs a region-word objective; unknown or bad values are clear errors
    for argv, message in ((["eval-generative", "--task", "box-zeroshot"], "not trained with objective 'region_word'"),
                          (["caption", "--beam", "0"], "--beam must be at least 1"),
                          (["caption", "--data", str(tmp_path)], "no committed shards")):
        assert main([*argv, "--checkpoint", str(trained / "run")]) == 1
        assert message in capsys.readouterr().err


@pytest.mark.e2e
def test_checkpoint_holds_the_heads_and_the_decoder(trained):
    pretrainer, text, cfg = load_pretrainer(str(trained / "run"))
    assert [o.name for o in pretrainer.objectives] == ["clip_infonce", "itg", "itm"]
    assert pretrainer.model.decoder is not None and pretrainer.model.fusion is not None
    assert text.vocab_size <= 300 and cfg.model.decoder.depth == 1


def test_box_zeroshot_task_scores_region_phrase_alignment():
    torch.manual_seed(0)
    tok = TextEncoder(train_tokenizer(["red circle", "blue square", "green star"] * 5, vocab_size=100), 8)
    cfg = ModelConfig(embed_dim=16, vision={"image_size": 16, "patch_size": 4, "width": 32, "depth": 1, "heads": 2},
                      text={"context_length": 8, "width": 32, "depth": 1, "heads": 2})
    model = build_model(cfg, vocab_size=tok.vocab_size)
    rw = build_objective(RegionWordConfig(), embed_dim=16, vision_width=32, model=model, vocab_size=tok.vocab_size)
    pretrainer = Pretrainer(model, [rw], [1.0]).eval()
    samples = [Sample(key=str(i), image=torch.randn(3, 16, 16), caption="", label=None,
                      regions=[{"box": [0.1, 0.1, 0.6, 0.6], "phrase": p}])
               for i, p in enumerate(["red circle", "blue square", "green star", "red circle"])]
    result = box_zeroshot_task(pretrainer, tok, samples)
    assert result["num_boxes"] == 4 and result["num_phrases"] == 3 and result["chance"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="regions"):
        box_zeroshot_task(pretrainer, tok, [Sample(key="x", image=torch.randn(3, 16, 16), caption="", label=None)])


def test_names_label_accepts_the_corpus_synonyms():
    from demo.corpus import word_synonyms

    syn = word_synonyms()
    assert names_label("a photo of a crimson disc.", "red circle", syn)
    assert names_label("a five-pointed star in blue", "blue star", syn)
    assert not names_label("a red square", "red circle", syn)
    assert not names_label("a reddish circle", "red circle", syn)  # whole words only
