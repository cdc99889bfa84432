"""Zero-shot class names and prompt templates from real-looking label values (issue 20,
item 7): folder names such as `signs_and_symbols` or `cls_03` are label values, not class
names. Names and templates come from `--classnames`/`--templates`, eval.class_names /
eval.prompt_templates, CLIP_benchmark's classnames.txt and
zeroshot_classification_templates.txt beside the data, or the label with underscores as
spaces; the report puts the majority-class rate beside uniform chance."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from cluster.cli.main import main
from vlm.config import ConfigError, load_config
from vlm.eval.datasets import beside_data
from vlm.eval.runner import evaluate_model, flat_metrics, format_results
from vlm.eval.zeroshot import build_prompts, resolve_class_names, resolve_templates, zeroshot_metrics
from vlm.models.registry import build_model
from vlm.data.tokenizer import TextEncoder, train_tokenizer

TINY = ["model.embed_dim=16", "model.vision.width=16", "model.vision.depth=1", "model.vision.heads=2",
        "model.vision.image_size=16", "model.vision.patch_size=4", "data.ingest.image_size=16",
        "model.text.width=16", "model.text.depth=1", "model.text.heads=2", "model.text.context_length=16",
        "eval.batch_size=4"]
WORDS = "a photo of the cat dog bird signs and symbols traffic light blurry art picture image plain background"
# class -> (colour, shape, images): imbalanced, the first class is 5 of 8 images
CLASSES = {"cls_03": ((200, 40, 40), "ellipse", 5), "cls_11": ((40, 160, 40), "rectangle", 2),
           "signs_and_symbols": ((40, 40, 200), "polygon", 1)}


class RecordingEncoder(TextEncoder):
    """The run's real text encoder, keeping every string it is asked to encode."""

    def __init__(self, tokenizer, context_length):
        super().__init__(tokenizer, context_length)
        self.seen: list[str] = []

    def __call__(self, texts):
        self.seen.extend(texts)
        return super().__call__(texts)


def tiny_model(overrides=()):
    cfg = load_config(None, TINY + list(overrides))
    tok = train_tokenizer([WORDS] * 5, vocab_size=80)
    torch.manual_seed(0)
    return build_model(cfg.model, tok.get_vocab_size()).eval(), RecordingEncoder(tok, 16), cfg, tok


def image_folder(root: Path, classes=CLASSES) -> Path:
    """ROOT/<label>/<i>.png: a coloured shape on a grey ground per class, jittered."""
    for label, (colour, shape, n) in classes.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            img = Image.new("RGB", (24, 24), (128, 128, 128))
            box = (3 + i % 3, 4, 19 + i % 3, 20)
            draw = ImageDraw.Draw(img)
            if shape == "polygon":
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
            else:
                getattr(draw, shape)(box, fill=colour)
            img.save(root / label / f"{i}.png")
    return root


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- name resolution --------------------------------------------------------------------


def test_without_any_names_underscores_become_spaces_in_the_prompts(tmp_path):
    model, text, cfg, _ = tiny_model()
    data = image_folder(tmp_path / "set")
    res = evaluate_model(model, text, cfg.eval, str(data), image_size=16, tasks=["zeroshot"])
    zs = res["zeroshot"]
    assert zs["class_labels"] == ["cls_03", "cls_11", "signs_and_symbols"]
    assert zs["classnames"] == ["cls 03", "cls 11", "signs and symbols"]
    assert "a photo of a signs and symbols." in text.seen
    assert not any("_" in prompt for prompt in text.seen)
    assert zs["templates_source"] == "built-in" and zs["classnames_source"] == "the labels, '_' as spaces"


def test_files_beside_an_image_folder_name_the_sorted_sub_folders(tmp_path):
    model, text, cfg, _ = tiny_model()
    data = image_folder(tmp_path / "set")
    write(data / "classnames.txt", "cat\ndog\nsigns and symbols\n\n")          # trailing blank lines are fine
    write(data / "zeroshot_classification_templates.txt", "a blurry photo of the {c}.\nart of a {c}\n")
    res = evaluate_model(model, text, cfg.eval, str(data), image_size=16, tasks=["zeroshot"])
    zs = res["zeroshot"]
    assert zs["classnames"] == ["cat", "dog", "signs and symbols"]
    assert zs["class_labels"] == ["cls_03", "cls_11", "signs_and_symbols"]
    assert zs["classnames_source"] == str(data / "classnames.txt")
    assert zs["templates"] == ["a blurry photo of the {c}.", "art of a {c}"]
    assert text.seen == ["a blurry photo of the cat.", "art of a cat", "a blurry photo of the dog.", "art of a dog",
                         "a blurry photo of the signs and symbols.", "art of a signs and symbols"]


def test_precedence_flags_then_config_then_files_beside_the_data(tmp_path):
    _, _, cfg, _ = tiny_model()
    data = image_folder(tmp_path / "set")
    labels = [p.parent.name for p in sorted(data.glob("*/*.png"))]
    write(data / "classnames.txt", "cat\ndog\nsign\n")
    write(data / "zeroshot_classification_templates.txt", "beside {c}\n")
    flag_names = write(tmp_path / "names.txt", "tabby cat\nsheep dog\nroad sign\n")
    flag_templates = write(tmp_path / "templates.txt", "flag {c}\n")
    mapped = cfg.eval.model_copy(update={"class_names": {"cls_03": "kitten", "cls_11": "puppy",
                                                         "signs_and_symbols": "symbol"},
                                         "prompt_templates": ["config {c}"]})

    assert resolve_class_names(labels, cfg.eval, str(data)).names == ["cat", "dog", "sign"]
    assert resolve_class_names(labels, mapped, str(data)).names == ["kitten", "puppy", "symbol"]
    flagged = resolve_class_names(labels, mapped, str(data), str(flag_names))
    assert flagged.names == ["tabby cat", "sheep dog", "road sign"] and flagged.source == f"--classnames {flag_names}"
    beside = str(data / "zeroshot_classification_templates.txt")
    assert resolve_templates(cfg.eval, str(data)) == (["beside {c}"], beside)
    assert resolve_templates(mapped, str(data)) == (["config {c}"], "eval.prompt_templates")
    assert resolve_templates(mapped, str(data), str(flag_templates))[0] == ["flag {c}"]
    assert build_prompts(flagged.names, ["flag {c}"]) == [["flag tabby cat"], ["flag sheep dog"], ["flag road sign"]]


def test_config_mapping_from_yaml_with_older_brace_templates(tmp_path):
    data = image_folder(tmp_path / "set")
    cfg = load_config(None, TINY + ["eval.class_names={cls_03: red disc, cls_11: green square, "
                                    "signs_and_symbols: blue triangle}",
                                    "eval.prompt_templates=['a photo of a {}.']"])
    model, text, _, _ = tiny_model()
    res = evaluate_model(model, text, cfg.eval, str(data), image_size=16, tasks=["zeroshot"])
    assert text.seen == ["a photo of a red disc.", "a photo of a green square.", "a photo of a blue triangle."]
    assert res["zeroshot"]["classnames_source"] == "eval.class_names"


def test_csv_and_shard_layouts_find_their_files(tmp_path):
    # next to a CSV
    data = image_folder(tmp_path / "imgs")
    table = tmp_path / "test.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in sorted(data.glob("*/*.png")):
            w.writerow([p.relative_to(tmp_path).as_posix(), p.parent.name])
    write(tmp_path / "classnames.txt", "cat\ndog\nsign\n")
    _, _, cfg, _ = tiny_model()
    labels = [p.parent.name for p in sorted(data.glob("*/*.png"))]
    assert resolve_class_names(labels, cfg.eval, str(table)).names == ["cat", "dog", "sign"]
    # CLIP_benchmark's webdataset layout: ROOT/classnames.txt, ROOT/test/*.tar
    shards = tmp_path / "wds" / "test"
    shards.mkdir(parents=True)
    with wds.TarWriter(str(shards / "0.tar")) as w:
        for i, p in enumerate(sorted(data.glob("*/*.png"))):
            w.write({"__key__": f"{i:04d}", "png": p.read_bytes(), "json": {"label": p.parent.name}})
    write(shards / "0_stats.json", json.dumps({"success": 8}))             # committed, as `vlm ingest` leaves it
    write(tmp_path / "wds" / "zeroshot_classification_templates.txt", "wds {c}\n")
    assert beside_data(str(shards), "zeroshot_classification_templates.txt") == tmp_path / "wds" / \
        "zeroshot_classification_templates.txt"
    model, text, cfg, _ = tiny_model(["eval.label_template='{label}'"])
    res = evaluate_model(model, text, cfg.eval, str(shards), image_size=16, tasks=["zeroshot"])
    assert text.seen == ["wds cls 03", "wds cls 11", "wds signs and symbols"]
    assert res["zeroshot"]["num_classes"] == 3


def test_integer_labels_are_class_indices(tmp_path):
    """Labels 0, 2, 10: line i + 1 names class i (not the text order 0, 10, 2), and every
    line of the file is a class of the classifier, as in CLIP_benchmark."""
    data = image_folder(tmp_path / "imgs", {"0": ((200, 0, 0), "ellipse", 2), "2": ((0, 200, 0), "rectangle", 1),
                                            "10": ((0, 0, 200), "polygon", 1)})
    names = [f"thing {i}" for i in range(12)]
    write(data / "classnames.txt", "\n".join(names) + "\n")
    model, text, cfg, _ = tiny_model()
    res = evaluate_model(model, text, cfg.eval, str(data), image_size=16, tasks=["zeroshot"])
    zs = res["zeroshot"]
    assert zs["num_classes"] == 12 and zs["classnames"] == names and zs["class_labels"][10] == "10"
    assert zs["chance"] == pytest.approx(1 / 12) and zs["majority_rate"] == pytest.approx(2 / 4)
    write(data / "classnames.txt", "\n".join(names[:10]) + "\n")
    with pytest.raises(ValueError, match=r"classnames\.txt: 10 class names, but the data has label 10"):
        evaluate_model(model, text, cfg.eval, str(data), image_size=16, tasks=["zeroshot"])


# ---- errors --------------------------------------------------------------------------------


def test_a_classnames_file_of_the_wrong_length_names_both_counts_and_the_file(tmp_path):
    model, text, cfg, _ = tiny_model()
    data = image_folder(tmp_path / "set")
    names = write(data / "classnames.txt", "cat\ndog\n")
    with pytest.raises(ValueError, match=rf"{names}: 2 class names for the 3 classes of the data "
                                         r"\(line i names the i-th label value in sorted order: cls_03, cls_11, "):
        evaluate_model(model, text, cfg.eval, str(data), image_size=16, tasks=["zeroshot"])
    write(data / "classnames.txt", "cat\n\ndog\nsign\n")
    with pytest.raises(ValueError, match=r"classnames\.txt line 2: blank line"):
        evaluate_model(model, text, cfg.eval, str(data), image_size=16, tasks=["zeroshot"])
    assert text.seen == []                                   # refused before any prompt is encoded


def test_a_template_without_the_slot_is_refused_naming_the_line(tmp_path):
    model, text, cfg, _ = tiny_model()
    data = image_folder(tmp_path / "set")
    bad = write(tmp_path / "t.txt", "a photo of a {c}.\na photo of a {}.\n")   # files use {c}, as CLIP_benchmark
    with pytest.raises(ValueError, match=rf"{bad} line 2: template 'a photo of a {{}}.' has no {{c}} slot"):
        evaluate_model(model, text, cfg.eval, str(data), image_size=16, tasks=["zeroshot"], templates=str(bad))
    with pytest.raises(ConfigError, match=r"eval\.prompt_templates: .*template 1 'a photo' has no \{c\} slot"):
        load_config(None, TINY + ["eval.prompt_templates=['a {c}', 'a photo']"])


def test_a_config_mapping_missing_a_label_names_it(tmp_path):
    model, text, cfg, _ = tiny_model(["eval.class_names={cls_03: cat, cls_11: dog}"])
    data = image_folder(tmp_path / "set")
    with pytest.raises(ConfigError, match=r"eval\.class_names names no class for 1 of the 3 labels of .*: "
                                          r"'signs_and_symbols'"):
        evaluate_model(model, text, cfg.eval, str(data), image_size=16, tasks=["zeroshot"])


# ---- majority rate -----------------------------------------------------------------------


def test_majority_rate_beside_uniform_chance():
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    out = zeroshot_metrics(torch.eye(3)[labels], labels, torch.eye(3))
    assert out["chance"] == pytest.approx(1 / 3) and out["majority_rate"] == pytest.approx(5 / 8)


def test_report_prints_the_majority_rate_on_an_imbalanced_folder(tmp_path):
    model, text, cfg, _ = tiny_model()
    res = evaluate_model(model, text, cfg.eval, str(image_folder(tmp_path / "set")), image_size=16)
    assert res["zeroshot"]["majority_rate"] == pytest.approx(5 / 8)
    assert flat_metrics(res)["zeroshot/majority_rate"] == pytest.approx(5 / 8)
    report = format_results(res)
    assert "(uniform chance 0.3333, majority class 0.6250, 3 classes)" in report
    assert "class names from the labels, '_' as spaces; 4 templates from built-in" in report


# ---- `vlm eval` end to end -----------------------------------------------------------------


@pytest.fixture
def export(tmp_path):
    """A randomly initialised tiny model as a `vlm ckpt export` file (what `vlm eval` loads)."""
    from safetensors.torch import save_file

    from vlm.checkpoint.export import EXPORT_FORMAT

    model, _, cfg, tok = tiny_model()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt", "vlm_format": EXPORT_FORMAT, "vlm_tokenizer": tok.to_str(),
                        "vlm_config": json.dumps(cfg.model_dump(mode="json"))})
    return path


def test_vlm_eval_with_classnames_and_templates_flags(tmp_path, export, capsys):
    data = image_folder(tmp_path / "set")
    names = write(tmp_path / "names.txt", "cat\ndog\nsigns and symbols\n")
    templates = write(tmp_path / "templates.txt", "a photo of the {c}.\n")
    out = tmp_path / "res.json"
    rc = main(["eval", "--checkpoint", str(export), "--data", str(data), "--task", "zeroshot",
               "--classnames", str(names), "--templates", str(templates), "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "uniform chance 0.3333, majority class 0.6250, 3 classes" in printed
    assert f"class names from --classnames {names}; 1 templates from --templates {templates}" in printed
    zs = json.loads(out.read_text())["zeroshot"]
    assert zs["classnames"] == ["cat", "dog", "signs and symbols"] and zs["templates"] == ["a photo of the {c}."]

    write(names, "cat\ndog\n")
    assert main(["eval", "--checkpoint", str(export), "--data", str(data), "--classnames", str(names)]) == 1
    assert "2 class names for the 3 classes" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(export), "--data", str(data), "--templates", str(tmp_path / "no")]) == 2
    assert f"--templates: {tmp_path / 'no'} is not a file" in capsys.readouterr().err
