"""Evaluation of a CLIP checkpoint (survey 2.3): zero-shot classification, image–text
retrieval, linear probe and zero-shot dense prediction — after training (`vlm eval`) and
periodically during it (`evaluate_distributed`, every `eval.every_steps`).

Data formats: vlm/eval/datasets.py. Result keys follow CLIP_benchmark where they overlap:
acc1, acc5, mean_per_class_recall, image_retrieval_recall@k (text -> image) and
text_retrieval_recall@k (image -> text); plus linear_probe_acc1 and dense_miou.

Protocols:
- zero-shot: a class embedding is the mean of its normalised prompt embeddings, renormalised;
  classes are the dataset's labels, each named and prompted as `resolve_class_names` and
  `resolve_templates` decide (README, "Class names and templates"). Beside uniform chance
  the share of the most frequent class is reported (`majority_rate`): the accuracy of a
  classifier that always answers it.
- linear probe: features are eval.probe_features ("embed": the normalised image embedding
  the zero-shot classifier also uses, so the two compare one linear head against another;
  "pooled": the class token before the projection, as in the CLIP paper). Without
  `probe_train`, the evaluation set is cut per class into alternate halves, probe-train and
  probe-test, and zero-shot accuracy on the same probe-test images is reported beside the
  probe (on the demo the held-out classes never occur in the training shards, so a probe
  trained there could not name them). With `probe_train` (a dataset), at most
  eval.probe_max_train of its items, evenly spaced, train the probe and the whole
  evaluation set tests it.
- dense: vlm/eval/dense.py (MaskCLIP features); classes are background
  (eval.background_prompts) plus the dataset's labels; each item's mask marks its own
  class; mIoU is over the classes present in the ground truth, background included.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vlm.checkpoint import store as checkpoint
from vlm.config import ConfigError, EvalConfig, RunConfig, config_from_dict
from vlm.eval.dense import confusion, miou, patch_features, predict_mask
from vlm.eval.datasets import (CLASSNAMES_FILE, TEMPLATES_FILE, EvalItem, beside_data, iter_items, load_image,
                           load_mask, read_lines)
from vlm.eval.linear_probe import evenly_spaced, linear_probe, stratified_halves
from vlm.models import CLIP, build_clip
from vlm.train.module import model_state_from_pretrainer
from vlm.data.tokenizer import TextEncoder

TASKS = ("zeroshot", "retrieval", "linear-probe", "dense")
EVAL_LOG = "eval_log.jsonl"
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


def retrieval_metrics(image_embed: torch.Tensor, text_embed: torch.Tensor, text_to_image: torch.Tensor,
                      ks: list[int], chunk: int = 1024) -> dict:
    """image_embed [N, E], text_embed [T, E], text_to_image [T] (index of each caption's image).

    Scores are computed in row chunks so memory is O(chunk·max(N, T)), never N×T at once."""
    n_img = image_embed.shape[0]
    # text -> image: rank of the true image among all images
    t2i_rank = []
    for s in range(0, text_embed.shape[0], chunk):
        scores = text_embed[s:s + chunk] @ image_embed.T
        true = scores.gather(1, text_to_image[s:s + chunk, None])
        t2i_rank.append((scores > true).sum(1))
    t2i_rank = torch.cat(t2i_rank)
    # image -> text: best rank among the image's captions
    i2t_rank = torch.full((n_img,), torch.iinfo(torch.long).max, dtype=torch.long)
    for s in range(0, n_img, chunk):
        scores = image_embed[s:s + chunk] @ text_embed.T  # [c, T]
        rows = torch.arange(s, min(s + chunk, n_img))
        own = text_to_image[None, :] == rows[:, None]     # [c, T] which captions are the image's
        best_true = scores.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
        i2t_rank[rows] = (scores > best_true).sum(1)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (t2i_rank < k).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (i2t_rank < k).float().mean().item()
    return out


def load_eval_model(path: str, *, verify_files: bool = True) -> tuple[CLIP, TextEncoder, RunConfig]:
    """A run dir, a checkpoint dir (any ZeRO stage: the weights are consolidated) or an
    export from `vlm ckpt export` (*.safetensors) -> (model in eval mode, text encoder,
    its config). A checkpoint is checked against its manifest first, a run's corrupt newest
    one skipped with a warning (checkpoint.resolve_verified); verify_files=False for a
    checkpoint dir its caller has verified already (hashing it again costs a full read)."""
    import json

    from vlm.checkpoint.export import consolidated_state, load_export

    if str(path).endswith(".safetensors"):
        tensors, meta = load_export(path)
        tree, tokenizer = json.loads(meta["vlm_config"]), meta["vlm_tokenizer"]
        weights = {k: v for k, v in tensors.items() if not k.startswith("objectives.")}
    else:
        ckpt = checkpoint.resolve_verified(path) if verify_files else checkpoint.resolve(path)
        state = checkpoint.load_trainer_state(ckpt)
        tree, tokenizer = state["config"], state["tokenizer"]
        weights = model_state_from_pretrainer(consolidated_state(ckpt, state))
    cfg = config_from_dict(tree)
    text = TextEncoder.from_json(tokenizer, cfg.model.text.context_length)
    model = build_clip(cfg.model, text.vocab_size)
    model.load_state_dict(weights)
    return model.eval(), text, cfg


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



def _prompt_embedding(model: CLIP, text: TextEncoder, prompts: list[str]) -> torch.Tensor:
    """Full sentences (no class slot) -> their mean normalised embedding, renormalised [E]."""
    return F.normalize(model.encode_text(*text(prompts)).mean(0), dim=-1)


def resolve_tasks(requested, index: list[EvalItem], data: str) -> tuple[str, ...]:
    """Requested tasks (empty = every task the data supports) -> the tasks to run.
    A requested task the data cannot support is an error naming the item that lacks it."""
    missing = {
        "zeroshot": next((i for i in index if i.label is None), None),
        "linear-probe": next((i for i in index if i.label is None), None),
        "retrieval": next((i for i in index if not i.captions), None),
        "dense": next((i for i in index if i.label is None or not i.has_mask), None),
    }
    if not requested:
        tasks = tuple(t for t in TASKS if missing[t] is None)
        if not tasks:
            raise ValueError(f"{data}: supports no evaluation task (items need labels or captions)")
        return tasks
    for task in requested:
        item = missing[task]
        if item is None:
            continue
        need = {"retrieval": "a caption", "dense": "a label and a mask"}.get(task, "a label")
        if task == "retrieval":
            reason = f"{item.origin} has no caption"
        elif item.label is None:
            reason = item.label_error or f"{item.origin} has no label"
        else:
            reason = f"{item.origin} has no mask"
        raise ValueError(f"{data}: task {task} needs {need} for every item: {reason}")
    return tuple(t for t in TASKS if t in requested)


@torch.no_grad()
def embed_share(model: CLIP, text: TextEncoder, data: str, indices: list[int], *, ev: EvalConfig,
                image_size: int, rank: int = 0, world_size: int = 1, captions: bool = True,
                dense_embed: torch.Tensor | None = None, dense_class: dict[str, int] | None = None) -> dict:
    """Embeds this rank's share (every world_size-th of ``indices``, from position rank).

    Returns {"index": [n] item indices, "image": [n, E], "pooled": [n, W], "text": [T, E],
    "text_item": [T] item index of each caption, "confusion": [K, K] or None}; with
    ``dense_embed`` ([K, E], row 0 the background) each item's mask is scored."""
    mine = set(indices[rank::world_size])
    out = {k: [] for k in ("index", "image", "pooled", "text", "text_item")}
    conf = None if dense_embed is None else torch.zeros(len(dense_embed), len(dense_embed), dtype=torch.long)
    batch: list[EvalItem] = []
    batch_index: list[int] = []

    def flush():
        nonlocal conf
        images = torch.stack([load_image(item, image_size) for item in batch])
        visual = model.visual(images)
        out["image"].append(F.normalize(visual["embed"], dim=-1))
        out["pooled"].append(visual["pooled"])
        out["index"].append(torch.tensor(batch_index))
        texts = [(i, c) for i, item in zip(batch_index, batch) for c in (item.captions if captions else [])]
        if texts:
            out["text"].append(model.encode_text(*text([c for _, c in texts])))
            out["text_item"].append(torch.tensor([i for i, _ in texts]))
        if dense_embed is not None:
            feats = patch_features(model.visual, images, ev.dense_features)
            for item, f in zip(batch, feats):
                mask = load_mask(item)
                target = mask.long() * (1 + dense_class[item.label])
                conf += confusion(predict_mask(f, dense_embed, tuple(mask.shape)), target, len(dense_embed))
        batch.clear(), batch_index.clear()

    for i, item in enumerate(iter_items(data, label_template=ev.label_template)):
        if i in mine:
            batch.append(item), batch_index.append(i)
            if len(batch) == ev.batch_size:
                flush()
    if batch:
        flush()
    # a rank with nothing to embed sends 1-D empties, which torch.cat skips
    share = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long if k in ("index", "text_item") else None)
             for k, v in out.items()}
    share["confusion"] = conf
    return share


def _gather(share: dict, world_size: int) -> dict:
    """Every rank's share -> the whole set in item order, identical on every rank."""
    if world_size == 1:
        parts = [share]
    else:
        import torch.distributed as dist

        parts = [None] * world_size
        dist.all_gather_object(parts, share)
    index = torch.cat([p["index"] for p in parts])
    order = index.argsort()
    text_item = torch.cat([p["text_item"] for p in parts])
    text_order = text_item.argsort(stable=True)  # each rank's captions are already in item order
    out = {"index": index[order], "image": torch.cat([p["image"] for p in parts])[order],
           "pooled": torch.cat([p["pooled"] for p in parts])[order],
           "text": torch.cat([p["text"] for p in parts])[text_order], "text_item": text_item[text_order],
           "confusion": None}
    if share["confusion"] is not None:
        out["confusion"] = sum(p["confusion"] for p in parts)
    return out


def _probe(ev: EvalConfig, feats: dict, labels: list[str], class_embed: torch.Tensor, classes: list[str],
           probe_feats: dict | None, probe_labels: list[str] | None) -> dict:
    key = "image" if ev.probe_features == "embed" else "pooled"
    if probe_feats is None:
        train, test = stratified_halves(labels)
        train = [train[i] for i in evenly_spaced(len(train), ev.probe_max_train)]
        train_x, train_y = feats[key][train], [labels[i] for i in train]
        split = "alternate halves of each class of the evaluation set"
    else:
        test = list(range(len(labels)))
        train_x, train_y = probe_feats[key], probe_labels
        split = "probe-train dataset; the whole evaluation set tests"
    res = linear_probe(train_x, train_y, feats[key][test], [labels[i] for i in test], c_grid=ev.probe_c_grid)
    index = {c: i for i, c in enumerate(classes)}
    zs = zeroshot_metrics(feats["image"][test], torch.tensor([index[labels[i]] for i in test]), class_embed)
    return {**res, "zeroshot_acc1": zs["acc1"], "features": ev.probe_features, "split": split}


@contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate_model(model: CLIP, text: TextEncoder, ev: EvalConfig, data: str, *, image_size: int,
                   tasks=None, probe_train: str | None = None, rank: int = 0, world_size: int = 1,
                   classnames: str | None = None, templates: str | None = None) -> dict:
    """Evaluates ``model`` on ``data`` (a shard dir, an image folder or a CSV).

    With world_size > 1 (torch.distributed initialised) each rank embeds every
    world_size-th item and the features are all-gathered, so every rank returns the same
    results as one process would. ``tasks``: empty/None = every task the data supports.
    ``classnames``/``templates``: files that name the classes and prompt them, ahead of
    the config and the data's own (`resolve_class_names`, `resolve_templates`)."""
    index = list(iter_items(data, label_template=ev.label_template, payload=False))
    tasks = resolve_tasks(tasks or ev.tasks, index, data)
    labels = [item.label for item in index]
    results: dict = {"dataset": str(data), "num_images": len(index), "tasks": list(tasks)}
    with _eval_mode(model), torch.no_grad():
        classes, class_embed, dense_embed = [], None, None
        if {"zeroshot", "linear-probe", "dense"} & set(tasks):
            named = resolve_class_names(labels, ev, data, classnames)
            prompt_templates, templates_source = resolve_templates(ev, data, templates)
            classes = named.labels
            class_embed = class_embeddings(model, text, named.names, prompt_templates)
        if "dense" in tasks:
            dense_embed = torch.cat([_prompt_embedding(model, text, ev.background_prompts)[None], class_embed])
        share = embed_share(model, text, data, list(range(len(index))), ev=ev, image_size=image_size, rank=rank,
                            world_size=world_size, captions="retrieval" in tasks, dense_embed=dense_embed,
                            dense_class={c: i for i, c in enumerate(classes)})
        feats = _gather(share, world_size)
        probe_feats = probe_labels = None
        if "linear-probe" in tasks and probe_train is not None:
            probe_index = list(iter_items(probe_train, label_template=ev.label_template, payload=False))
            if any(item.label is None for item in probe_index):
                bad = next(item for item in probe_index if item.label is None)
                raise ValueError(f"--probe-train needs a label for every item: {bad.label_error or bad.origin}")
            chosen = evenly_spaced(len(probe_index), ev.probe_max_train)
            probe_feats = _gather(embed_share(model, text, probe_train, chosen, ev=ev, image_size=image_size,
                                              rank=rank, world_size=world_size, captions=False), world_size)
            probe_labels = [probe_index[i].label for i in probe_feats["index"].tolist()]
            results["probe_train"] = str(probe_train)
    if "zeroshot" in tasks:
        index_of = {c: i for i, c in enumerate(classes)}
        zs = zeroshot_metrics(feats["image"], torch.tensor([index_of[c] for c in labels]), class_embed)
        results["zeroshot"] = {**zs, "classnames": named.names, "class_labels": classes,
                               "classnames_source": named.source, "templates": prompt_templates,
                               "templates_source": templates_source}
    if "retrieval" in tasks:
        results["retrieval"] = {**retrieval_metrics(feats["image"], feats["text"], feats["text_item"], ev.recall_at),
                                "num_captions": int(feats["text"].shape[0])}
    if "linear-probe" in tasks:
        results["linear_probe"] = _probe(ev, feats, labels, class_embed, classes, probe_feats, probe_labels)
    if "dense" in tasks:
        results["dense"] = {**miou(feats["confusion"]), "classnames": ["background", *named.names],
                            "features": ev.dense_features, "background_in_mean": True}
    return results


def evaluate_distributed(model: CLIP, text: TextEncoder, cfg: RunConfig, data: str | None = None, *,
                         rank: int, world_size: int, tasks=None) -> dict:
    """Periodic evaluation from the training loop: call on EVERY rank (a collective) with the
    bare CLIP (not the DeepSpeed engine). Each rank embeds 1/world_size of ``data`` (default
    the run's data.eval_shards); all ranks return the same results, equal to one process's.
    The model is put in eval mode and back. Tasks: ``tasks`` or eval.tasks, or all the data
    supports."""
    data = data or cfg.path(cfg.data.eval_shards)
    return evaluate_model(model, text, cfg.eval, data, image_size=cfg.model.vision.image_size, tasks=tasks,
                          rank=rank, world_size=world_size)


def append_eval_log(run_dir: str | Path, step: int, results: dict) -> Path:
    """Appends {"step", "time", **results} as one line of run_dir/eval_log.jsonl (rank 0 only)."""
    path = Path(run_dir) / EVAL_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "time": time.time(), **results}) + "\n")
    return path


def flat_metrics(results: dict) -> dict[str, float]:
    """The headline numbers as {"zeroshot/acc1": ..., "dense/dense_miou": ...}, for gauges."""
    out = {}
    for task in ("zeroshot", "retrieval", "linear_probe", "dense"):
        for key, value in results.get(task, {}).items():
            if isinstance(value, float) and key not in ("chance", "best_C"):
                out[f"{task}/{key}"] = value
    return out


def format_results(results: dict) -> str:
    lines = []
    zs = results.get("zeroshot")
    if zs:
        majority = f", majority class {zs['majority_rate']:.4f}" if "majority_rate" in zs else ""
        lines.append(f"zero-shot top-1: {zs['acc1']:.4f} (uniform chance {zs['chance']:.4f}{majority}, "
                     f"{zs['num_classes']} classes)")
        lines.append(f"zero-shot top-5: {zs['acc5']:.4f}   mean per-class recall: {zs['mean_per_class_recall']:.4f}")
        if "classnames_source" in zs:
            lines.append(f"zero-shot class names from {zs['classnames_source']}; {len(zs['templates'])} "
                         f"templates from {zs['templates_source']}")
    rt = results.get("retrieval")
    if rt:
        ks = sorted({int(k.split("@")[1]) for k in rt if "@" in k})
        lines.append("image->text recall@" + "/".join(map(str, ks)) + ": " +
                     " / ".join(f"{rt[f'text_retrieval_recall@{k}']:.4f}" for k in ks))
        lines.append("text->image recall@" + "/".join(map(str, ks)) + ": " +
                     " / ".join(f"{rt[f'image_retrieval_recall@{k}']:.4f}" for k in ks))
    lp = results.get("linear_probe")
    if lp:
        lines.append(f"linear-probe top-1: {lp['linear_probe_acc1']:.4f} (zero-shot on the same {lp['num_test']} "
                     f"test images: {lp['zeroshot_acc1']:.4f}; C={lp['best_C']:g}, {lp['features']} features, "
                     f"{lp['num_train'] + lp['num_val']} training images)")
    dn = results.get("dense")
    if dn:
        lines.append(f"dense mIoU: {dn['dense_miou']:.4f} (pixel accuracy {dn['dense_pixel_acc']:.4f}, "
                     f"{sum(dn['present'])} classes present incl. background, {dn['features']} features)")
    return "\n".join(lines)
