import pytest
import torch
import torch.nn.functional as F

from vlm.eval.retrieval import retrieval_metrics
from vlm.eval.zeroshot import zeroshot_metrics


def onehot(idx, dim):
    return F.one_hot(torch.tensor(idx), dim).float()


def test_zeroshot_known_answers():
    classes = torch.eye(4)                    # class c embeds along axis c
    # 8 images: the first 6 point at their class; image 6 (class 2) points at class 3,
    # image 7 (class 3) points mostly at 0 and a little at 3 (top-5 still hits).
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    img = onehot([0, 0, 1, 1, 2, 2, 3, 0], 4)
    img[7, 3] = 0.5
    out = zeroshot_metrics(F.normalize(img, dim=-1), labels, classes)
    assert out["acc1"] == pytest.approx(6 / 8)
    assert out["acc5"] == 1.0                 # only 4 classes: top-5 covers all
    # per-class recall: 1, 1, 2/3, 0
    assert out["mean_per_class_recall"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    assert out["chance"] == 0.25 and out["num_classes"] == 4


def test_retrieval_known_answers_with_several_captions_per_image():
    # 3 images on axes 0..2; 5 captions: image 0 has captions 0,1; image 1 has 2; image 2 has 3,4.
    images = torch.eye(3)
    text_to_image = torch.tensor([0, 0, 1, 2, 2])
    # caption 1 ranks its image third (after 1 and 2), caption 3 points to image 0 (wrong, but its
    # true image is second best), the rest are right.
    texts = torch.stack([onehot(0, 3), torch.tensor([0, 1, 0.5]), onehot(1, 3), torch.tensor([0.9, 0, 0.4]), onehot(2, 3)])
    for chunk in (1, 2, 1024):
        out = retrieval_metrics(images, texts, text_to_image, ks=[1, 2], chunk=chunk)
        # text -> image: captions 0,2,4 right at rank 0; caption 3 rank 1; caption 1 rank 2
        assert out["image_retrieval_recall@1"] == pytest.approx(3 / 5)
        assert out["image_retrieval_recall@2"] == pytest.approx(4 / 5)
        # image -> text: image 0's own caption 0 is top; image 1: captions 1 and 2 tie at
        # score 1 (a tie is not "better", so its own caption 2 counts as rank 0); image 2:
        # caption 4 is top.
        assert out["text_retrieval_recall@1"] == 1.0


def test_retrieval_counts_a_miss():
    images = torch.eye(2)
    texts = torch.eye(2).flip(0)              # each caption points at the other image
    out = retrieval_metrics(images, texts, torch.tensor([0, 1]), ks=[1, 2])
    assert out["image_retrieval_recall@1"] == 0.0 and out["text_retrieval_recall@1"] == 0.0
    assert out["image_retrieval_recall@2"] == 1.0 and out["text_retrieval_recall@2"] == 1.0


# ---- linear probe, dense prediction, data formats, distributed evaluation ------------------

import json
import os
from pathlib import Path

from PIL import Image

from vlm.eval.dense import confusion, miou, patch_features, predict_mask
from vlm.eval.runner import append_eval_log, evaluate_distributed, evaluate_model, flat_metrics
from vlm.eval.linear_probe import linear_probe, stratified_halves
from support.evalsets import tiny_model, write_csv_set
from support.ports import free_port


def test_linear_probe_on_separable_features_is_exact():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 4
    labels = [f"class{i % 3}" for i in range(60)]
    x = torch.stack([centres[i % 3] + 0.3 * torch.randn(3, generator=gen) for i in range(60)])
    train, test = stratified_halves(labels)
    assert len(train) == len(test) == 30 and not set(train) & set(test)
    out = linear_probe(x[train], [labels[i] for i in train], x[test], [labels[i] for i in test],
                       c_grid=[0.01, 1.0, 100.0])
    assert out["linear_probe_acc1"] == 1.0
    assert out["num_train"] + out["num_val"] == 30 and out["num_val"] == 7 and out["num_test"] == 30
    assert set(out["C_sweep"]) == {"0.01", "1.0", "100.0"}


def test_linear_probe_counts_a_class_it_never_saw_as_wrong():
    x = torch.tensor([[1.0, 0], [1.1, 0], [0, 1.0], [0, 1.2], [1, 1.0]])
    out = linear_probe(x[:4], ["a", "a", "b", "b"], torch.tensor([[1.0, 0], [0, 1.0], [1, 1.0]]), ["a", "b", "c"],
                       c_grid=[1.0])
    assert out["linear_probe_acc1"] == pytest.approx(2 / 3)


def test_dense_miou_hand_computed():
    # 2x2 patches, classes (background, A, B) on the axes: top-left says A, bottom-right B,
    # the rest background; upsampled x2 the quadrants stay whole.
    patches = torch.zeros(2, 2, 3)
    patches[0, 0, 1] = patches[0, 1, 0] = patches[1, 0, 0] = patches[1, 1, 2] = 1.0
    pred = predict_mask(patches, torch.eye(3), (4, 4))
    assert pred.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]]
    target = torch.zeros(4, 4, dtype=torch.long)
    target[:, :2] = 1                          # object A fills the left half
    out = miou(confusion(pred, target, 3))
    # A: TP 4, FN 4 -> 4/8; background: TP 4, FN 4, FP 4 -> 4/12; B absent from the truth
    assert out["iou"][:2] == pytest.approx([1 / 3, 0.5])
    assert out["present"] == [True, True, False]
    assert out["dense_miou"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert out["dense_pixel_acc"] == 0.5


def test_maskclip_features_keep_each_patch_to_itself():
    # One block: with the query-key attention skipped a patch's feature depends on that patch
    # alone, while the ordinary tokens mix every patch.
    model, _, _ = tiny_model(overrides=["model.vision.depth=1"])
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    changed = images.clone()
    changed[..., :4, :4] = -changed[..., :4, :4]           # patch (0, 0) only
    for mode, mixes in (("maskclip", False), ("tokens", True)):
        a, b = patch_features(model.visual, images, mode), patch_features(model.visual, changed, mode)
        diff = (a - b).abs().amax(-1)[0]
        assert diff[0, 0] > 1e-3
        assert (diff.flatten()[1:].max() > 1e-4) == mixes, mode
    assert a.shape == (1, 4, 4, 16) and torch.allclose(a.norm(dim=-1), torch.ones(1, 4, 4))


def test_csv_with_several_captions_per_image_runs_every_task(tmp_path):
    model, text, cfg = tiny_model()
    table = write_csv_set(tmp_path, 9, captions_per_image=2)
    res = evaluate_model(model, text, cfg.eval, str(table), image_size=16)
    assert res["tasks"] == ["zeroshot", "retrieval", "linear-probe", "dense"]
    assert res["num_images"] == 9 and res["retrieval"]["num_captions"] == 18
    assert res["zeroshot"]["num_classes"] == 3 and res["dense"]["classnames"][0] == "background"
    assert res["linear_probe"]["num_test"] == 3 and 0 <= res["dense"]["dense_miou"] <= 1
    assert set(flat_metrics(res)) >= {"zeroshot/acc1", "retrieval/image_retrieval_recall@1",
                                      "linear_probe/linear_probe_acc1", "dense/dense_miou"}


def test_image_folder_takes_classes_from_folders_and_has_no_retrieval(tmp_path):
    model, text, cfg = tiny_model()
    for cls in ("red star", "blue cross"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.jpg")
    res = evaluate_model(model, text, cfg.eval, str(tmp_path), image_size=16)
    assert res["tasks"] == ["zeroshot", "linear-probe"]
    assert res["zeroshot"]["classnames"] == ["blue cross", "red star"]
    with pytest.raises(ValueError, match=r"task retrieval needs a caption for every item: .*0\.jpg has no caption"):
        evaluate_model(model, text, cfg.eval, str(tmp_path), image_size=16, tasks=["retrieval"])


def test_malformed_csv_errors_name_the_file_and_column(tmp_path):
    model, text, cfg = tiny_model()
    bad = tmp_path / "bad.csv"
    bad.write_text("file,caption\na.png,x\n")
    with pytest.raises(ValueError, match=r"bad\.csv: needs a 'path' column"):
        evaluate_model(model, text, cfg.eval, str(bad), image_size=16)
    bad.write_text("path,caption\nmissing.png,x\n")
    with pytest.raises(FileNotFoundError, match=r"bad\.csv line 2: column 'path' names 'missing.png'"):
        evaluate_model(model, text, cfg.eval, str(bad), image_size=16)
    table = write_csv_set(tmp_path / "d", 3, masks=False)
    with pytest.raises(ValueError, match=r"task dense needs a label and a mask for every item: .* has no mask"):
        evaluate_model(model, text, cfg.eval, str(table), image_size=16, tasks=["dense"])


def test_eval_log_appends_jsonl(tmp_path):
    append_eval_log(tmp_path, 10, {"zeroshot": {"acc1": 0.5}})
    append_eval_log(tmp_path, 20, {"zeroshot": {"acc1": 0.75}})
    lines = [json.loads(x) for x in (tmp_path / "eval_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20] and lines[1]["zeroshot"]["acc1"] == 0.75 and "time" in lines[0]


def _distributed_worker(rank: int, world_size: int, port: int, table: str, out_dir: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, text, cfg = tiny_model()
        model.train()                                     # evaluation switches to eval mode and back
        res = evaluate_distributed(model, text, cfg, table, rank=rank, world_size=world_size)
        assert model.training
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    table = write_csv_set(tmp_path / "data", 11, captions_per_image=2)  # 11 images: not divisible by 2
    model, text, cfg = tiny_model()
    single = evaluate_distributed(model, text, cfg, str(table), rank=0, world_size=1)
    port = free_port()  # a loopback port nobody listens on
    mp.spawn(_distributed_worker, args=(2, port, str(table), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert single["tasks"] == ranks[0]["tasks"] == ["zeroshot", "retrieval", "linear-probe", "dense"]
    assert ranks[0]["dense"]["iou"] == single["dense"]["iou"]     # pixel counts: exact
    assert flat_metrics(ranks[0]) == pytest.approx(flat_metrics(single), abs=1e-6)
