"""Evaluation of a CLIP checkpoint (survey 2.3): chooses the protocols by name and runs them on one embedding pass.

Runs after training (`vlm eval`) and periodically during it (`evaluate_distributed`, every
`eval.every_steps`). Data formats: vlm/eval/datasets.py. Each protocol is one module with a
function of one shape, EvalContext -> its results (PROTOCOLS): zero-shot classification
(vlm/eval/zeroshot.py), image-text retrieval (retrieval.py), linear probe (linear_probe.py)
and zero-shot dense prediction (dense.py). Result keys follow CLIP_benchmark where they
overlap: acc1, acc5, mean_per_class_recall, image_retrieval_recall@k (text -> image) and
text_retrieval_recall@k (image -> text); plus linear_probe_acc1 and dense_miou."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from vlm import rundir
from vlm.config import EvalConfig, RunConfig
from vlm.data.tokenizer import TextEncoder
from vlm.eval.context import EvalContext
from vlm.eval.datasets import EvalItem, iter_items
from vlm.eval.dense import dense_class_embed, evaluate_dense
from vlm.eval.features import embed_share, gather_shares
from vlm.eval.linear_probe import evaluate_linear_probe, probe_train_features
from vlm.eval.retrieval import evaluate_retrieval
from vlm.eval.zeroshot import class_embeddings, evaluate_zeroshot, resolve_class_names, resolve_templates
from vlm.models.clip import CLIP

# task name -> protocol; the order is the order tasks run and results are reported in
PROTOCOLS = {"zeroshot": evaluate_zeroshot, "retrieval": evaluate_retrieval,
             "linear-probe": evaluate_linear_probe, "dense": evaluate_dense}
TASKS = tuple(PROTOCOLS)
EVAL_LOG = "eval_log.jsonl"


def result_key(task: str) -> str:
    """The results key of a task: "linear-probe" -> "linear_probe"."""
    return task.replace("-", "_")


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


@contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)



def _embed_set(model: CLIP, text: TextEncoder, ev: EvalConfig, data: str, tasks: tuple[str, ...], labels: list, *,
               image_size: int, rank: int, world_size: int, classnames: str | None,
               templates: str | None) -> EvalContext:
    """Names and embeds the classes the tasks need, then embeds the evaluation set (this
    rank's share, gathered) -> the context every protocol reads."""
    ctx = EvalContext(ev=ev, labels=labels)
    dense_embed = None
    if {"zeroshot", "linear-probe", "dense"} & set(tasks):
        named = resolve_class_names(labels, ev, data, classnames)
        ctx.templates, ctx.templates_source = resolve_templates(ev, data, templates)
        ctx.class_labels, ctx.class_names, ctx.classnames_source = named.labels, named.names, named.source
        ctx.class_embed = class_embeddings(model, text, named.names, ctx.templates)
    if "dense" in tasks:
        dense_embed = dense_class_embed(model, text, ev.background_prompts, ctx.class_embed)
    share = embed_share(model, text, data, list(range(len(labels))), ev=ev, image_size=image_size, rank=rank,
                        world_size=world_size, captions="retrieval" in tasks, dense_embed=dense_embed,
                        dense_class={c: i for i, c in enumerate(ctx.class_labels)})
    ctx.feats = gather_shares(share, world_size)
    return ctx


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
        ctx = _embed_set(model, text, ev, data, tasks, labels, image_size=image_size, rank=rank,
                         world_size=world_size, classnames=classnames, templates=templates)
        if "linear-probe" in tasks and probe_train is not None:
            ctx.probe_feats, ctx.probe_labels = probe_train_features(
                model, text, probe_train, ev=ev, image_size=image_size, rank=rank, world_size=world_size)
            results["probe_train"] = str(probe_train)
    for task in tasks:
        results[result_key(task)] = PROTOCOLS[task](ctx)
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


def append_eval_log(run_dir: str | Path, step: int, results: dict) -> str:
    """Appends {"step", "time", **results} as one line of run_dir/eval_log.jsonl (rank 0
    only); run_dir may be a URL (vlm.rundir). Returns the log's path or URL."""
    path = rundir.join(run_dir, EVAL_LOG)
    rundir.append_text(path, json.dumps({"step": step, "time": time.time(), **results}) + "\n")
    return path


def flat_metrics(results: dict) -> dict[str, float]:
    """The headline numbers as {"zeroshot/acc1": ..., "dense/dense_miou": ...}, for gauges."""
    out = {}
    for task in map(result_key, TASKS):
        for key, value in results.get(task, {}).items():
            if isinstance(value, float) and key not in ("chance", "best_C"):
                out[f"{task}/{key}"] = value
    return out


def format_results(results: dict) -> str:
    """The results as the lines `vlm eval` prints, one protocol after another."""
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
