"""Zero-shot detection (vlm/eval/detection.py) on a generated COCO-format set, with a tiny CLIP trained here.

The model is trained for a few seconds on one-shape pictures named by their category
(tests/support/cocogen.py), so its region features can tell the categories apart; the
figures are then real: box accuracy against chance for RoI-aligned and crop features, and
AP from pycocotools. AP itself is checked on hand-made detections against pycocotools run
directly, and the edges: bad proposals, an unreadable image, perfect and shifted boxes."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from support.cocogen import CATEGORIES, single_shape, write_coco, write_proposals
from vlm.config import load_config
from vlm.data.pixels import normalise, to_uint8_hwc
from vlm.data.tokenizer import TextEncoder, train_tokenizer
from vlm.eval.coco import load_coco, load_proposals
from vlm.eval.detection import coco_ap, evaluate_detection, format_detection, token_map
from vlm.eval.zeroshot import DEFAULT_TEMPLATES, fill_template
from vlm.models.registry import build_model

SIZE = 32
TINY = ["model.embed_dim=32", "model.vision.width=32", "model.vision.depth=2", "model.vision.heads=2",
        f"model.vision.image_size={SIZE}", "model.vision.patch_size=4", f"data.ingest.image_size={SIZE}",
        "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "model.text.context_length=24",
        "eval.batch_size=16"]


def _untrained(overrides=()):
    cfg = load_config(None, TINY + list(overrides))
    words = [fill_template(t, c) for t in DEFAULT_TEMPLATES for c in CATEGORIES]
    tok = train_tokenizer(words * 5, vocab_size=300)
    torch.manual_seed(0)
    return build_model(cfg.model, tok.get_vocab_size()), TextEncoder(tok, 24), cfg


def _train(model, text, steps: int = 60) -> None:
    """Pictures of one shape against the prompts of the six categories (cross-entropy over classes)."""
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(steps):
        labels = torch.tensor(rng.integers(0, len(CATEGORIES), 48))
        images = normalise(torch.stack([to_uint8_hwc(single_shape(rng, CATEGORIES[i], SIZE)) for i in labels.tolist()]))
        prompts = [fill_template(DEFAULT_TEMPLATES[step % len(DEFAULT_TEMPLATES)], c) for c in CATEGORIES]
        logits = 10 * model.encode_image(images) @ model.encode_text(*text(prompts)).T
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(), loss.backward(), opt.step()
    model.eval()


@pytest.fixture(scope="module")
def trained():
    model, text, cfg = _untrained()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is faster than several contending for 2 cores
    try:
        _train(model, text)
    finally:
        torch.set_num_threads(threads)
    return model, text, cfg


@pytest.fixture(scope="module")
def cocoset(tmp_path_factory):
    root = write_coco(tmp_path_factory.mktemp("coco"), 40, size=64)
    return root, write_proposals(root, root.parent / "proposals.json")


@pytest.mark.parametrize("region", ["roi", "crop"])
def test_trained_model_beats_chance_on_boxes_and_proposals(trained, cocoset, region):
    model, text, cfg = trained
    root, proposals = cocoset
    r = evaluate_detection(model, text, cfg.eval, str(root), image_size=SIZE, proposals=str(proposals), region=region)
    d = r["detection"]
    print(region, format_detection(r))
    assert d["chance"] == pytest.approx(1 / 6) and d["num_classes"] == 6 and r["skipped"] == []
    assert d["box_acc1"] > d["chance"] + 0.5 and d["box_mean_per_class_recall"] > 0.6
    assert d["box_acc5"] >= d["box_acc1"]
    assert d["ap50"] > 0.6 and 0 < d["map"] <= d["ap50"]
    assert d["num_boxes"] == len(json.loads((root / "instances.json").read_text())["annotations"])


def test_the_accuracy_comes_from_training(trained, cocoset):
    # the same model before training: near chance, so the figures above measure what it learned
    model, text, cfg = _untrained()
    before = evaluate_detection(model.eval(), text, cfg.eval, str(cocoset[0]), image_size=SIZE)["detection"]
    after = evaluate_detection(trained[0], trained[1], cfg.eval, str(cocoset[0]), image_size=SIZE)["detection"]
    assert before["box_acc1"] < after["box_acc1"] - 0.4


def test_without_proposals_the_ground_truth_boxes_are_classified(trained, cocoset):
    model, text, cfg = trained
    d = evaluate_detection(model, text, cfg.eval, str(cocoset[0] / "instances.json"), image_size=SIZE)["detection"]
    assert d["box_acc1"] > 0.6 and "ap50" not in d
    assert d["classnames"] == CATEGORIES and d["templates_source"] == "built-in"


def test_classnames_file_renames_the_categories(trained, cocoset, tmp_path):
    model, text, cfg = trained
    names = tmp_path / "names.txt"  # one line per category name in sorted order
    names.write_text("\n".join(f"thing {i}" for i in range(len(CATEGORIES))) + "\n")
    d = evaluate_detection(model, text, cfg.eval, str(cocoset[0]), image_size=SIZE, classnames=str(names))["detection"]
    assert d["classnames"][CATEGORIES.index("blue circle")] == "thing 0"
    assert d["classnames_source"] == f"--classnames {names}"


def _perfect(root):
    tree = json.loads((root / "instances.json").read_text())
    return tree, [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                  for a in tree["annotations"]]


def test_ap_of_perfect_and_shifted_detections(cocoset):
    coco = load_coco(cocoset[0])
    ids = [im.id for im in coco.images]
    _, perfect = _perfect(cocoset[0])
    assert coco_ap(coco.dataset, ids, perfect) == {"ap50": pytest.approx(1.0), "map": pytest.approx(1.0)}
    assert coco_ap(coco.dataset, ids, []) == {"ap50": 0.0, "map": 0.0}
    # boxes far apart, so a shifted detection can only meet its own box: shifted by 0.6 of its
    # width IoU is 0.4 / 1.6 = 0.25 (a miss at 0.5), by 0.2 it is 0.8 / 1.2 = 0.67 (a hit)
    tree = {"images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30], "area": 1200,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [120, 40, 30, 50], "area": 1500,
                             "iscrowd": 0}]}

    def shifted(share):
        return [{"image_id": 1, "category_id": a["category_id"], "score": 0.9,
                 "bbox": [a["bbox"][0] + share * a["bbox"][2], *a["bbox"][1:]]} for a in tree["annotations"]]

    assert coco_ap(tree, [1], shifted(0.6))["ap50"] == 0.0
    assert coco_ap(tree, [1], shifted(0.2))["ap50"] == pytest.approx(1.0)


def test_ap_matches_pycocotools_run_directly(cocoset):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(5)
    tree, perfect = _perfect(cocoset[0])
    dets = [{**d, "bbox": [v + float(rng.normal(0, 3)) for v in d["bbox"][:2]] + d["bbox"][2:],
             "category_id": d["category_id"] if rng.random() < 0.7 else 1 + (d["category_id"] % 6),
             "score": float(rng.random())} for d in perfect]
    ours = coco_ap(load_coco(cocoset[0]).dataset, [im["id"] for im in tree["images"]], dets)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(cocoset[0] / "instances.json"))
        run = COCOeval(gt, gt.loadRes(dets), "bbox")
        run.evaluate(), run.accumulate(), run.summarize()
    assert 0.2 < ours["ap50"] < 0.95
    assert ours == {"ap50": pytest.approx(run.stats[1]), "map": pytest.approx(run.stats[0])}


@pytest.mark.parametrize("entry, message", [
    ({"bbox": [1, 2, 3, 4]}, "entry 1: needs the field 'image_id'"),
    ({"image_id": 999, "bbox": [1, 2, 3, 4]}, "entry 1: 'image_id' 999 is no image"),
    ({"image_id": 1, "bbox": [1, 2, 3]}, "entry 1: 'bbox' must be a list [x, y, w, h]"),
    ({"image_id": 1, "bbox": [1, 2, 0, 4]}, "entry 1: 'bbox' [1, 2, 0, 4] has no area"),
    ({"image_id": 1, "bbox": [1, 2, 3, 4], "score": "high"}, "entry 1: 'score' must be a finite number"),
])
def test_bad_proposals_are_clear_errors(cocoset, tmp_path, entry, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 5, 5]}, entry]))
    with pytest.raises(ValueError, match=f"{bad}.*{message.replace('[', '.').replace(']', '.')}"):
        load_proposals(bad, load_coco(cocoset[0]))


def test_proposals_must_be_a_list(cocoset, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": [[0, 0, 5, 5]]}))
    with pytest.raises(ValueError, match="must be a JSON list"):
        load_proposals(bad, load_coco(cocoset[0]))


def test_bad_annotations_name_the_entry(tmp_path):
    root = write_coco(tmp_path, 2)
    tree = json.loads((root / "instances.json").read_text())
    tree["annotations"][1]["category_id"] = 77
    (root / "instances.json").write_text(json.dumps(tree))
    with pytest.raises(ValueError, match=r"annotations\[1\]: 'category_id' 77 is no category"):
        load_coco(root)


def test_unreadable_image_is_skipped_and_named(trained, tmp_path):
    model, text, cfg = trained
    root = write_coco(tmp_path / "set", 6)
    (root / "images" / "0002.png").write_bytes(b"not a png")
    (root / "images" / "0004.png").unlink()
    r = evaluate_detection(model, text, cfg.eval, str(root), image_size=SIZE,
                           proposals=str(write_proposals(root, tmp_path / "p.json")))
    assert [s["image_id"] for s in r["skipped"]] == [3, 5] and r["detection"]["num_skipped"] == 2
    assert r["skipped"][0]["file"].endswith("0002.png") and "0002.png" in format_detection(r)
    tree = json.loads((root / "instances.json").read_text())
    assert r["detection"]["num_boxes"] == sum(a["image_id"] not in (3, 5) for a in tree["annotations"])
    assert r["detection"]["ap50"] > 0.5  # the skipped images' boxes are not counted as misses


def test_resnet_tower_gives_region_features_and_refuses_tokens(tmp_path):
    model, text, cfg = _untrained(["model.vision.type=resnet", "model.vision.width=8", "model.vision.layers=[1,1,1,1]",
                                   "model.vision.heads=2", "model.vision.image_size=64", "data.ingest.image_size=64"])
    model.eval()
    maps = token_map(model.visual, torch.zeros(2, 3, 64, 64), "maskclip")
    assert maps.shape == (2, 32, 2, 2) and torch.allclose(maps.norm(dim=1), torch.ones(2, 2, 2))
    root = write_coco(tmp_path, 4)
    for region in ("roi", "crop"):
        d = evaluate_detection(model, text, cfg.eval, str(root), image_size=64, region=region)["detection"]
        assert d["num_boxes"] > 0 and 0 <= d["box_acc1"] <= 1
    with pytest.raises(ValueError, match="ResNet image tower has region features only as 'maskclip'"):
        token_map(model.visual, torch.zeros(1, 3, 64, 64), "tokens")


def test_vlm_eval_detection_end_to_end(trained, cocoset, tmp_path, capsys):
    """`vlm eval --task detection` on an export of the trained model: the same figures as the
    function, printed and written; a detection flag without the task is refused."""
    from safetensors.torch import save_file

    from cluster.cli.main import main
    from vlm.checkpoint.export import EXPORT_FORMAT

    model, text, cfg = trained
    export = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(export),
              metadata={"format": "pt", "vlm_format": EXPORT_FORMAT, "vlm_tokenizer": text.tokenizer.to_str(),
                        "vlm_config": json.dumps(cfg.model_dump(mode="json"))})
    root, proposals = cocoset
    out = tmp_path / "det.json"
    assert main(["eval", "--checkpoint", str(export), "--data", str(root / "instances.json"), "--task", "detection",
                 "--proposals", str(proposals), "--region", "crop", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    direct = evaluate_detection(model, text, cfg.eval, str(root), image_size=SIZE, proposals=str(proposals),
                                region="crop")["detection"]
    written = json.loads(out.read_text())["detection"]
    assert written["box_acc1"] == pytest.approx(direct["box_acc1"]) and written["ap50"] == pytest.approx(direct["ap50"])
    assert written["ap50"] > 0.6
    assert f"detection AP@0.5: {direct['ap50']:.4f}" in printed and f"box top-1: {direct['box_acc1']:.4f}" in printed
    assert main(["eval", "--checkpoint", str(export), "--data", str(root), "--region", "crop"]) == 2
    assert "--region only apply to --task detection" in capsys.readouterr().err
