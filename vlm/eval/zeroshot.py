"""Zero-shot classification: class names, prompt templates, class embeddings and accuracy.

A class embedding is the mean of its normalised prompt embeddings, renormalised; classes are
the dataset's labels, each named and prompted as `resolve_class_names` and
`resolve_templates` decide (README, "Class names and templates"). Beside uniform chance the
share of the most frequent class is reported (`majority_rate`): the accuracy of a
classifier that always answers it. Result keys follow CLIP_benchmark: acc1, acc5,
mean_per_class_recall."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vlm.config import ConfigError, EvalConfig
from vlm.data.tokenizer import TextEncoder
from vlm.eval.context import EvalContext
from vlm.eval.datasets import CLASSNAMES_FILE, TEMPLATES_FILE, beside_data, read_lines
from vlm.models.clip import CLIP

TEMPLATE_SLOT = "{c}"  # CLIP_benchmark's class slot; "{}" is still read in eval.prompt_templates
DEFAULT_TEMPLATES = ("a photo of a {c}.", "a picture of a {c}.", "an image of a {c}.", "a {c} on a plain background.")


def zeroshot_metrics(image_embed: torch.Tensor, labels: torch.Tensor, class_embed: torch.Tensor) -> dict:
    """image_embed [N, E], labels [N] class indices, class_embed [C, E] -> accuracies."""
    logits = image_embed @ class_embed.T
    k = min(5, class_embed.shape[0])
    topk = logits.topk(k, dim=1).indices
    hit1 = topk[:, 0] == labels
    hit5 = (topk == labels[:, None]).any(dim=1)
    present = labels.unique()
    per_class = torch.stack([hit1[labels == c].float().mean() for c in present])
    return {"acc1": hit1.float().mean().item(), "acc5": hit5.float().mean().item(),
            "mean_per_class_recall": per_class.mean().item(), "num_classes": int(class_embed.shape[0]),
            "chance": 1.0 / class_embed.shape[0],
            "majority_rate": torch.bincount(labels).max().item() / labels.numel()}


@dataclass
class ZeroshotClasses:
    """The zero-shot classes: class i is label value ``labels[i]`` of the data, named
    ``names[i]`` in its prompts; ``source`` says where the names came from."""
    labels: list[str]
    names: list[str]
    source: str


def label_to_name(label: str) -> str:
    """The name a label stands for when nothing names it: folder names such as
    ``signs_and_symbols`` use underscores for spaces."""
    return label.replace("_", " ")


def _is_index(label: str) -> bool:
    return label.isascii() and label.isdigit() and str(int(label)) == label


def class_order(labels) -> list[str]:
    """The distinct label values in class order: by value when every one is a class index
    (an integer without leading zeros), else sorted as text, as ImageFolder sorts folders."""
    distinct = set(labels)
    if distinct and all(_is_index(label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _names_from_file(present: list[str], file: Path, source: str) -> ZeroshotClasses:
    names = [name for _, name in read_lines(file)]
    if all(_is_index(label) for label in present):
        # class indices (CLIP_benchmark): line i + 1 names class i, and every line is a class
        if int(present[-1]) >= len(names):
            raise ValueError(f"{file}: {len(names)} class names, but the data has label {present[-1]} (labels "
                             f"that are all integers are class indices: line i + 1 names label i)")
        return ZeroshotClasses([str(i) for i in range(len(names))], names, source)
    if len(names) != len(present):
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise ValueError(f"{file}: {len(names)} class names for the {len(present)} classes of the data (line i "
                         f"names the i-th label value in sorted order: {shown})")
    return ZeroshotClasses(present, names, source)


def resolve_class_names(labels, ev: EvalConfig, data: str, classnames_file: str | None = None) -> ZeroshotClasses:
    """Names the classes of ``labels``. First of: the file ``classnames_file`` (`--classnames`),
    the mapping eval.class_names, classnames.txt beside the data, the label itself with
    underscores as spaces. A file has one name a line, in class order (`class_order`)."""
    present = class_order(labels)
    if classnames_file is not None:
        return _names_from_file(present, Path(classnames_file), f"--classnames {classnames_file}")
    if ev.class_names:
        missing = [label for label in present if label not in ev.class_names]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ConfigError(f"eval.class_names names no class for {len(missing)} of the {len(present)} labels "
                              f"of {data}: {shown}")
        return ZeroshotClasses(present, [ev.class_names[label] for label in present], "eval.class_names")
    beside = beside_data(str(data), CLASSNAMES_FILE)
    if beside is not None:
        return _names_from_file(present, beside, str(beside))
    return ZeroshotClasses(present, [label_to_name(label) for label in present], "the labels, '_' as spaces")


def _templates_from_file(file: Path) -> list[str]:
    out = []
    for n, template in read_lines(file):
        if TEMPLATE_SLOT not in template:
            raise ValueError(f"{file} line {n}: template {template!r} has no {TEMPLATE_SLOT} slot for the class name")
        out.append(template)
    return out


def resolve_templates(ev: EvalConfig, data: str, templates_file: str | None = None) -> tuple[list[str], str]:
    """-> (templates, where they came from). First of: ``templates_file`` (`--templates`),
    eval.prompt_templates, zeroshot_classification_templates.txt beside the data, the
    built-in DEFAULT_TEMPLATES. A file has one template a line, each with the slot {c}."""
    if templates_file is not None:
        return _templates_from_file(Path(templates_file)), f"--templates {templates_file}"
    if ev.prompt_templates:
        return list(ev.prompt_templates), "eval.prompt_templates"
    beside = beside_data(str(data), TEMPLATES_FILE)
    if beside is not None:
        return _templates_from_file(beside), str(beside)
    return list(DEFAULT_TEMPLATES), "built-in"


def fill_template(template: str, name: str) -> str:
    """Puts ``name`` into the {c} slot (or the {} slot of an older config); other braces stay."""
    return template.replace(TEMPLATE_SLOT if TEMPLATE_SLOT in template else "{}", name)


def build_prompts(names: list[str], templates: list[str]) -> list[list[str]]:
    """The prompts of each class, the sentences its text embedding averages."""
    return [[fill_template(t, name) for t in templates] for name in names]


@torch.no_grad()
def class_embeddings(model: CLIP, text: TextEncoder, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """Each class: mean of its normalised prompt embeddings, renormalised -> [C, E]."""
    out = []
    for prompts in build_prompts(classnames, templates):
        emb = model.encode_text(*text(prompts))
        out.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(out)


def prompt_embedding(model: CLIP, text: TextEncoder, prompts: list[str]) -> torch.Tensor:
    """Full sentences (no class slot) -> their mean normalised embedding, renormalised [E]."""
    return F.normalize(model.encode_text(*text(prompts)).mean(0), dim=-1)


def evaluate_zeroshot(ctx: EvalContext) -> dict:
    """The zero-shot protocol: every item classified among the classes -> results["zeroshot"]."""
    index_of = {c: i for i, c in enumerate(ctx.class_labels)}
    zs = zeroshot_metrics(ctx.feats["image"], torch.tensor([index_of[c] for c in ctx.labels]), ctx.class_embed)
    return {**zs, "classnames": ctx.class_names, "class_labels": ctx.class_labels,
            "classnames_source": ctx.classnames_source, "templates": ctx.templates,
            "templates_source": ctx.templates_source}
