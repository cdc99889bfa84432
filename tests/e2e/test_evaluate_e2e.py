"""End to end: one tiny `vlm train` run, then `vlm eval` (through cluster.cli.main.main) prints
zero-shot, retrieval, linear-probe and dense figures on held-out shards that carry shape
masks, on an image folder and on a CSV built here."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cluster.cli.main import main
from demo.corpus import heldout_pairs, make_caption, render_image_and_mask
from support.shardgen import TINY_MODEL, set_args, write_shards

pytestmark = pytest.mark.e2e
VLM = str(Path(sys.executable).parent / "vlm")
REPO = Path(__file__).resolve().parents[2]
TINY = [*TINY_MODEL, "train.micro_batch_size=8", "train.log_every=20", "metrics.port=0", "name=eval-e2e"]
FIGURES = ("zero-shot top-1:", "image->text recall@1/5/10:", "linear-probe top-1:", "dense mIoU:")


def heldout_samples(n: int, seed: int = 3):
    """(key, png bytes at 32 px, mask png at 64 px, caption, colour, shape) from the generator."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        colour, shape = heldout_pairs()[i % 12]
        pixels, bbox, tone, mask = render_image_and_mask(rng, colour, shape, 64)
        caption, _ = make_caption(rng, colour, shape, bbox, 64, tone)
        img, m = io.BytesIO(), io.BytesIO()
        Image.fromarray(pixels).resize((32, 32), Image.BICUBIC).save(img, format="PNG")
        Image.fromarray(mask.astype(np.uint8) * 255).save(m, format="PNG")
        yield f"{i:06d}", img.getvalue(), m.getvalue(), caption, colour, shape


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    write_shards(root / "shards" / "train", n=240, per_shard=60)
    held = root / "shards" / "heldout"
    held.mkdir(parents=True)
    samples = list(heldout_samples(144))
    with wds.TarWriter(str(held / "00000.tar")) as w:
        for key, img, mask, caption, colour, shape in samples:
            w.write({"__key__": key, "png": img, "mask.png": mask, "txt": caption,
                     "json": {"colour": colour, "shape": shape, "label": f"{colour} {shape}"}})
    (held / "00000_stats.json").write_text(json.dumps({"success": len(samples)}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([VLM, "train", "--config", "configs/demo.yaml", "--set", f"run_dir={root}",
                           "--set", "train.steps=150", "--set", "train.checkpoint_every=1000",
                           *set_args(*TINY)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return root, samples


def vlm_eval(capsys, *args) -> tuple[int, str, str]:
    rc = main(["eval", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_heldout_shards_all_four_figures_and_probe_beats_zeroshot(run, capsys):
    root, _ = run
    rc, out, err = vlm_eval(capsys, "--checkpoint", str(root), "--output", str(root / "eval.json"))
    assert rc == 0, err
    print(out)
    for line in FIGURES:
        assert line in out
    res = json.loads((root / "eval.json").read_text())
    assert res["num_images"] == 144 and res["zeroshot"]["num_classes"] == 12
    lp = res["linear_probe"]
    assert lp["num_test"] == 72 and lp["features"] == "embed"
    # the same 72 probe-test images for both: a trained linear head beats the prompt classifier
    assert lp["linear_probe_acc1"] >= lp["zeroshot_acc1"]
    assert res["dense"]["classnames"][0] == "background" and 0 < res["dense"]["dense_miou"] <= 1
    assert res["dense"]["present"] == [True] * 13


def test_image_folder_with_masks(run, capsys, tmp_path):
    root, samples = run
    for key, img, mask, _, colour, shape in samples[:48]:
        d = tmp_path / f"{colour} {shape}"
        d.mkdir(exist_ok=True)
        (d / f"{key}.png").write_bytes(img)
        (d / f"{key}.mask.png").write_bytes(mask)
    rc, out, err = vlm_eval(capsys, "--checkpoint", str(root), "--data", str(tmp_path),
                            "--set", "eval.dense_features=tokens", "--output", str(tmp_path / "r.json"))
    assert rc == 0, err
    print(out)
    assert "zero-shot top-1:" in out and "linear-probe top-1:" in out and "dense mIoU:" in out
    assert "recall@" not in out                       # an image folder has no captions
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["tasks"] == ["zeroshot", "linear-probe", "dense"] and res["dense"]["features"] == "tokens"


def test_csv_with_two_captions_per_image(run, capsys, tmp_path):
    root, samples = run
    rows = []
    for key, img, mask, caption, colour, shape in samples[:36]:
        (tmp_path / f"{key}.png").write_bytes(img)
        (tmp_path / "m").mkdir(exist_ok=True)
        (tmp_path / "m" / f"{key}.png").write_bytes(mask)
        for c in (caption, f"a photo of a {colour} {shape}."):
            rows.append({"path": f"{key}.png", "caption": c, "label": f"{colour} {shape}", "mask": f"m/{key}.png"})
    with open(tmp_path / "set.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(), w.writerows(rows)
    rc, out, err = vlm_eval(capsys, "--checkpoint", str(root), "--data", str(tmp_path / "set.csv"),
                            "--probe-train", str(root / "shards" / "heldout"), "--output", str(tmp_path / "r.json"))
    assert rc == 0, err
    print(out)
    for line in FIGURES:
        assert line in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["retrieval"]["num_captions"] == 72 and res["num_images"] == 36
    assert res["linear_probe"]["num_test"] == 36 and res["probe_train"].endswith("heldout")


def test_bad_data_is_a_clear_error(run, capsys, tmp_path):
    root, _ = run
    (tmp_path / "x.csv").write_text("image,caption\na.png,hi\n")
    rc, _, err = vlm_eval(capsys, "--checkpoint", str(root), "--data", str(tmp_path / "x.csv"))
    assert rc == 1 and "x.csv: needs a 'path' column" in err
    rc, _, err = vlm_eval(capsys, "--checkpoint", str(root), "--data", str(root / "shards" / "train"),
                          "--task", "dense")
    assert rc == 1 and "task dense needs a label and a mask" in err and "has no mask" in err
    rc, _, err = vlm_eval(capsys, "--checkpoint", str(root), "--set", "train.steps=3")
    assert rc == 2 and "only takes eval.* keys" in err
