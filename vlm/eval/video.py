"""Action recognition on video (survey 2.3): clips subsampled into frames, each frame through the image tower, pooled.

`vlm eval --task video-zeroshot` and `--task video-linear-probe`. Each clip becomes
``frames`` frames (vlm/eval/video_data.py: uniformly spread, or at a stride), every frame is
embedded by the image tower exactly as an evaluation image is, and the frame embeddings
are pooled into one clip embedding:

- ``mean``: the mean over frames; it holds what the frames show, not the order they show it in;
- ``diff``: the mean, concatenated with the mean of the differences between consecutive
  frames (the change from the first frame to the last, per frame), so the direction of a
  motion is a linear function of it;
- ``concat``: the means of ``SEGMENTS`` consecutive parts of the clip, concatenated, so a
  linear probe may weigh the beginning, middle and end differently.

Zero-shot classifies the mean-pooled clip embedding, renormalised, against class
embeddings built from action prompts (``ACTION_TEMPLATES`` unless --templates,
eval.prompt_templates or the data's template file say otherwise); class names resolve
as for images (vlm/eval/zeroshot.py). The linear probe is vlm/eval/linear_probe.py's, on
the chosen pooling of eval.probe_features (the normalised frame embeddings, or the tower's
features before its projection), trained on alternate halves of each class or on a
separate ``probe_train`` set. Unreadable clips are skipped and listed with their reason;
a set with no readable clip is an error."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm.config import EvalConfig
from vlm.data.pixels import normalise, tower_norm
from vlm.data.tokenizer import TextEncoder
from vlm.eval.linear_probe import evenly_spaced, linear_probe, stratified_halves
from vlm.eval.video_data import Clip, Unreadable, VideoLimits, decode_clip, list_clips
from vlm.eval.zeroshot import class_embeddings, resolve_class_names, resolve_templates, zeroshot_metrics
from vlm.models.clip import CLIP

VIDEO_TASKS = ("video-zeroshot", "video-linear-probe")
POOLINGS = ("mean", "diff", "concat")
SEGMENTS = 4  # the parts `concat` pools separately (fewer when a clip has fewer frames)
SHOWN_SKIPPED = 20  # skipped clips printed by name; --output's JSON lists every one
ACTION_TEMPLATES = ("a video of a person {c}.", "a video of {c}.", "a clip of a person {c}.", "a person {c}.")


def pool_frames(x: torch.Tensor, pooling: str) -> torch.Tensor:
    """Frame features [C, N, D] -> clip features: [C, D] (mean), [C, 2D] (diff) or
    [C, min(N, SEGMENTS) * D] (concat)."""
    if pooling == "mean":
        return x.mean(1)
    if pooling == "diff":
        steps = x[:, 1:] - x[:, :-1] if x.shape[1] > 1 else torch.zeros_like(x)
        return torch.cat([x.mean(1), steps.mean(1)], dim=1)
    if pooling == "concat":
        parts = torch.tensor_split(x, min(x.shape[1], SEGMENTS), dim=1)
        return torch.cat([p.mean(1) for p in parts], dim=1)
    raise ValueError(f"unknown pooling {pooling!r} (one of {', '.join(POOLINGS)})")


@torch.no_grad()
def embed_clips(model: CLIP, clips: list[Clip], *, batch_size: int, image_size: int, frames: int,
                stride: int | None, limits: VideoLimits) -> tuple[dict, list[Clip], list[dict]]:
    """Decodes and embeds every clip -> ({"embed": [C, N, E] normalised, "pooled": [C, N, W]}
    for the C clips read, those clips, [{"path", "label", "reason"}] of those skipped). Frames go
    through the tower about ``batch_size`` at a time, whole clips per batch."""
    out: dict[str, list] = {"embed": [], "pooled": []}
    kept, skipped, batch = [], [], []

    def flush():
        visual = model.visual(normalise(torch.cat(batch), *tower_norm(model.visual)))
        out["embed"].append(F.normalize(visual["embed"], dim=-1).unflatten(0, (len(batch), frames)))
        out["pooled"].append(visual["pooled"].unflatten(0, (len(batch), frames)))
        batch.clear()

    for clip in clips:
        try:
            batch.append(decode_clip(clip.path, frames=frames, image_size=image_size, stride=stride, limits=limits))
        except Unreadable as e:
            skipped.append({"path": str(clip.path), "label": clip.label, "reason": str(e)})
            continue
        kept.append(clip)
        if len(batch) * frames >= batch_size:
            flush()
    if batch:
        flush()
    return {k: torch.cat(v) if v else None for k, v in out.items()}, kept, skipped


def _read_set(model: CLIP, data: str, ev: EvalConfig, **embed_kw) -> tuple[dict, list[Clip], list[dict]]:
    """Lists and embeds one clip set; a set with no clip, or none readable, is an error."""
    clips = list_clips(data)
    if not clips:
        raise ValueError(f"{data}: no video clips (files ending in mp4, m4v, mov, mkv, webm or avi, in one "
                         f"sub-folder per class, or listed in a CSV)")
    feats, kept, skipped = embed_clips(model, clips, batch_size=ev.batch_size, **embed_kw)
    if not kept:
        first = skipped[0]
        raise ValueError(f"{data}: none of its {len(clips)} clips could be read (first: {first['path']}: "
                         f"{first['reason']})")
    return feats, kept, skipped


def video_templates(ev: EvalConfig, data: str, templates: str | None) -> tuple[list[str], str]:
    """The zero-shot templates: as resolve_templates decides, with action prompts in place
    of its built-in photo prompts."""
    found, source = resolve_templates(ev, data, templates)
    if source == "built-in":
        return list(ACTION_TEMPLATES), "built-in (actions)"
    return found, source


def video_zeroshot(model: CLIP, text: TextEncoder, ev: EvalConfig, data: str, feats: dict, labels: list[str], *,
                   all_labels: list[str], classnames: str | None, templates: str | None) -> dict:
    """Zero-shot accuracy of the mean-pooled, renormalised clip embeddings. The classes are
    every label of the set (``all_labels``, skipped clips' included)."""
    named = resolve_class_names(all_labels, ev, data, classnames)
    prompts, source = video_templates(ev, data, templates)
    class_embed = class_embeddings(model, text, named.names, prompts)
    index = {c: i for i, c in enumerate(named.labels)}
    clip_embed = F.normalize(pool_frames(feats["embed"], "mean"), dim=-1)
    zs = zeroshot_metrics(clip_embed, torch.tensor([index[c] for c in labels]), class_embed)
    return {**zs, "classnames": named.names, "class_labels": named.labels, "classnames_source": named.source,
            "templates": prompts, "templates_source": source}


def video_linear_probe(ev: EvalConfig, feats: dict, labels: list[str], pooling: str,
                       probe: tuple[dict, list[str]] | None = None) -> dict:
    """The linear probe on pooled clip features: trained on alternate halves of each class
    (at most eval.probe_max_train clips) and tested on the other halves, or trained on
    ``probe`` (features, labels of a probe-train set) and tested on every clip."""
    key = "embed" if ev.probe_features == "embed" else "pooled"
    x = pool_frames(feats[key], pooling)
    if probe is None:
        train, test = stratified_halves(labels)
        train = [train[i] for i in evenly_spaced(len(train), ev.probe_max_train)]
        train_x, train_y = x[train], [labels[i] for i in train]
        split = "alternate halves of each class of the evaluation set"
    else:
        test = list(range(len(labels)))
        train_x, train_y = pool_frames(probe[0][key], pooling), probe[1]
        split = "probe-train dataset; the whole evaluation set tests"
    test_y = [labels[i] for i in test]
    res = linear_probe(train_x, train_y, x[test], test_y, c_grid=ev.probe_c_grid)
    classes = sorted(set(labels) | set(train_y))
    majority = max(test_y.count(c) for c in classes) / len(test_y)
    return {**res, "chance": 1.0 / len(classes), "majority_rate": majority, "num_classes": len(classes),
            "pooling": pooling, "features": ev.probe_features, "split": split}


def _check_args(tasks, frames: int, stride: int | None, pooling: str) -> list[str]:
    """The tasks to run, in VIDEO_TASKS order (empty: both); a bad argument is a ValueError."""
    unknown = sorted(set(tasks or ()) - set(VIDEO_TASKS))
    if unknown:
        raise ValueError(f"unknown video task(s) {', '.join(unknown)} (one of {', '.join(VIDEO_TASKS)})")
    if frames < 1 or (stride is not None and stride < 1):
        raise ValueError(f"frames ({frames}) and the frame stride ({stride}) must be at least 1")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r} (one of {', '.join(POOLINGS)})")
    return [t for t in VIDEO_TASKS if t in (tasks or VIDEO_TASKS)]


def evaluate_video(model: CLIP, text: TextEncoder, ev: EvalConfig, data: str, *, image_size: int, tasks,
                   frames: int = 8, stride: int | None = None, pooling: str = "mean", classnames: str | None = None,
                   templates: str | None = None, probe_train: str | None = None,
                   limits: VideoLimits = VideoLimits()) -> dict:
    """Evaluates ``model`` on the clips of ``data`` (a clip folder or a CSV) for ``tasks``
    (a subset of VIDEO_TASKS; empty means both). ``pooling`` is the linear probe's
    (zero-shot always pools by the mean). -> {"dataset", "tasks", "num_clips", "num_read",
    "frames", "sampling", "skipped": [{"path", "label", "reason"}], "video_zeroshot": {...},
    "video_linear_probe": {...}}; a probe-train set's skipped clips are listed too."""
    tasks = _check_args(tasks, frames, stride, pooling)
    embed_kw = dict(image_size=image_size, frames=frames, stride=stride, limits=limits)
    was_training = model.training
    model.eval()
    try:
        feats, kept, skipped = _read_set(model, data, ev, **embed_kw)
        labels = [c.label for c in kept]
        results = {"dataset": str(data), "tasks": tasks, "num_clips": len(kept) + len(skipped),
                   "num_read": len(kept), "frames": frames,
                   "sampling": "uniform" if stride is None else f"every {stride} frames", "skipped": skipped}
        if "video-zeroshot" in tasks:
            results["video_zeroshot"] = video_zeroshot(
                model, text, ev, data, feats, labels, all_labels=labels + [s["label"] for s in skipped],
                classnames=classnames, templates=templates)
        if "video-linear-probe" in tasks:
            probe = None
            if probe_train is not None:
                probe_feats, probe_kept, probe_skipped = _read_set(model, probe_train, ev, **embed_kw)
                chosen = evenly_spaced(len(probe_kept), ev.probe_max_train)
                probe = ({k: v[chosen] for k, v in probe_feats.items()}, [probe_kept[i].label for i in chosen])
                results.update(probe_train=str(probe_train), skipped=skipped + probe_skipped)
            results["video_linear_probe"] = video_linear_probe(ev, feats, labels, pooling, probe)
    finally:
        model.train(was_training)
    return results


def format_video_results(results: dict) -> str:
    """The lines `vlm eval` prints for the video tasks."""
    lines = [f"{results['num_read']} of {results['num_clips']} clips read, {results['frames']} frames each "
             f"({results['sampling']})"]
    zs = results.get("video_zeroshot")
    if zs:
        lines.append(f"video zero-shot top-1: {zs['acc1']:.4f} (uniform chance {zs['chance']:.4f}, majority class "
                     f"{zs['majority_rate']:.4f}, {zs['num_classes']} classes); top-5: {zs['acc5']:.4f}; mean "
                     f"per-class recall: {zs['mean_per_class_recall']:.4f}")
        lines.append(f"video zero-shot class names from {zs['classnames_source']}; {len(zs['templates'])} templates "
                     f"from {zs['templates_source']}")
    lp = results.get("video_linear_probe")
    if lp:
        lines.append(f"video linear-probe top-1: {lp['linear_probe_acc1']:.4f} (uniform chance {lp['chance']:.4f}, "
                     f"majority class {lp['majority_rate']:.4f}; {lp['pooling']} pooling of {lp['features']} "
                     f"features, C={lp['best_C']:g}, {lp['num_train'] + lp['num_val']} training clips)")
    skipped = results["skipped"]
    lines += [f"skipped {skip['path']}: {skip['reason']}" for skip in skipped[:SHOWN_SKIPPED]]
    if len(skipped) > SHOWN_SKIPPED:
        lines.append(f"... and {len(skipped) - SHOWN_SKIPPED} more skipped (all of them in --output's 'skipped')")
    return "\n".join(lines)
