"""Zero-shot object detection (survey 2.3): given boxes classified by region features against class text embeddings.

The survey's protocol compares given object proposals with the text embeddings of the
category names. Each box gets a region feature in the joint embedding space:

- ``roi``: the whole image is resized to S x S (squashed, so every box stays in view and
  maps by its fractions of the width and height), the image tower's token map is taken in
  the joint space (a ViT's through vlm/eval/dense.py's ``patch_features``, MaskCLIP value
  features or plain tokens as eval.dense_features says; a ResNet's through its attention
  pool's value and output projections, MaskCLIP's ResNet recipe) and RoI-aligned per box;
- ``crop``: each box is cut from the image, resized to S x S and encoded as a whole image,
  the usual CLIP baseline (one forward pass per box).

Class embeddings are zero-shot classification's (prompt templates averaged). Ground-truth
boxes give box-classification accuracy; proposals, when given, are labelled with their best
class, scored (proposal score x class probability) and evaluated by pycocotools' COCOeval
(AP at IoU 0.5 and mAP over IoU .5:.95). Without proposals the ground-truth boxes are the
proposals and only accuracy is reported. Images that do not decode are skipped and named."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.ingest.codec import open_image
from vlm.config import EvalConfig
from vlm.data.batches import MAX_PIXELS
from vlm.data.pixels import normalise, to_uint8_hwc, tower_norm
from vlm.data.tokenizer import TextEncoder
from vlm.eval.coco import CocoImage, CocoSet, load_coco, load_proposals
from vlm.eval.dense import patch_features
from vlm.eval.zeroshot import class_embeddings, resolve_class_names, resolve_templates, zeroshot_metrics
from vlm.models.clip import CLIP
from vlm.models.resnet import ModifiedResNet
from vlm.models.roi import roi_align
from vlm.models.vit import VisionTransformer

REGIONS = ("roi", "crop")
# class probabilities are softmax(PROB_SCALE * cosine): CLIP's learned logit scale is capped at 100
PROB_SCALE = 100.0


def read_image(image: CocoImage, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image's pixels as RGB, within the pixel budget checked on the header before any
    pixel is decoded (data_pipeline's open_image); raises for any file that does not decode."""
    img = open_image(image.path.read_bytes(), max_pixels)
    img.load()
    return img.convert("RGB")


@torch.no_grad()
def token_map(visual: torch.nn.Module, images: torch.Tensor, mode: str) -> torch.Tensor:
    """images [B, 3, S, S] -> L2-normalised per-position embeddings in the joint space [B, E, h, w].

    ViT: vlm.eval.dense.patch_features (``mode`` "maskclip" or "tokens"). ResNet: the final
    feature map with the attention pool's positional embedding, through its value and output
    projections (each position's own value, as the pool would average it); "tokens" has no
    meaning there (the ResNet's tokens are not in the joint space) and is refused."""
    if isinstance(visual, VisionTransformer):
        return patch_features(visual, images, mode).permute(0, 3, 1, 2)
    if isinstance(visual, ModifiedResNet):
        if mode != "maskclip":
            raise ValueError(f"a ResNet image tower has region features only as 'maskclip' (its attention pool's "
                             f"value path), not {mode!r}: set eval.dense_features=maskclip")
        tokens = visual(images)["tokens"]  # [B, hw, C]
        pool = visual.attnpool
        embed = F.normalize(pool.proj(pool.v(tokens + pool.pos_embed[1:])), dim=-1)
        side = int(tokens.shape[1] ** 0.5)
        return embed.transpose(1, 2).unflatten(2, (side, side))
    raise ValueError(f"region features need a ViT or ResNet image tower, not {type(visual).__name__}")


def embed_dim(visual: torch.nn.Module) -> int:
    """The joint embedding width of a ViT or ResNet image tower."""
    head = visual.attnpool.proj if isinstance(visual, ModifiedResNet) else visual.proj
    return head.out_features


def box_fractions(boxes: list[list[float]], width: float, height: float) -> torch.Tensor:
    """[x, y, w, h] pixel boxes of a width x height image -> [N, 4] (x0, y0, x1, y1) fractions in [0, 1]."""
    b = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
    scale = torch.tensor([width, height, width, height])
    return (torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1) / scale).clamp(0, 1)


def _model_input(model: CLIP, pictures: list[Image.Image], image_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    pixels = torch.stack([to_uint8_hwc(p.resize((image_size, image_size), Image.BICUBIC)) for p in pictures])
    return normalise(pixels.to(device), *tower_norm(model.visual))


@torch.no_grad()
def roi_features(model: CLIP, pictures: list[Image.Image], fractions: list[torch.Tensor], *, image_size: int,
                 mode: str) -> torch.Tensor:
    """Each picture squashed to S x S, its token map RoI-aligned at its boxes (``fractions``,
    one [n_i, 4] per picture) -> L2-normalised region embeddings [sum n_i, E] in picture order."""
    maps = token_map(model.visual, _model_input(model, pictures, image_size), mode)
    boxes = torch.cat(fractions).to(maps.device)
    if boxes.shape[0] == 0:
        return maps.new_zeros(0, maps.shape[1])
    index = torch.cat([torch.full((len(f),), i, dtype=torch.long) for i, f in enumerate(fractions)]).to(maps.device)
    pooled = roi_align(maps, boxes, index, output_size=2, sampling_ratio=2).mean(dim=(2, 3))
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def crop_features(model: CLIP, pictures: list[Image.Image], fractions: list[torch.Tensor], *, image_size: int,
                  batch_size: int) -> torch.Tensor:
    """Each box cut from its picture (at least one pixel a side), resized to S x S and
    encoded by the image tower -> L2-normalised embeddings [sum n_i, E] in picture order."""
    crops = []
    for picture, boxes in zip(pictures, fractions):
        w, h = picture.size
        for x0, y0, x1, y1 in boxes.tolist():
            left, top = min(int(x0 * w), w - 1), min(int(y0 * h), h - 1)
            crops.append(picture.crop((left, top, max(round(x1 * w), left + 1), max(round(y1 * h), top + 1))))
    out = [model.encode_image(_model_input(model, crops[i:i + batch_size], image_size))
           for i in range(0, len(crops), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, embed_dim(model.visual))


def _region_features(model, pictures, fractions, *, image_size, region, ev) -> torch.Tensor:
    if region == "roi":
        return roi_features(model, pictures, fractions, image_size=image_size, mode=ev.dense_features)
    return crop_features(model, pictures, fractions, image_size=image_size, batch_size=ev.batch_size)


def _embed_boxes(model: CLIP, coco: CocoSet, proposals: dict | None, ev: EvalConfig, *, image_size: int,
                 region: str) -> dict:
    """Reads every image (skipping those that do not decode) and embeds its ground-truth
    boxes and its proposals -> {"gt": [N, E], "gt_label": [N], "prop": [M, E],
    "prop_image": [M] image ids, "prop_box", "prop_score", "read": image ids, "skipped"}."""
    out = {"gt": [], "gt_label": [], "prop": [], "prop_image": [], "prop_box": [], "prop_score": [],
           "read": [], "skipped": []}
    batch: list[tuple[CocoImage, Image.Image]] = []

    def flush():
        fractions, sizes = [], []
        for image, _ in batch:
            keep = [b for b, crowd in zip(image.boxes, image.crowd) if not crowd]
            boxes = keep + (proposals[image.id][0] if proposals is not None else [])
            fractions.append(box_fractions(boxes, image.width, image.height))
            sizes.append(len(keep))
            out["gt_label"] += [lab for lab, crowd in zip(image.labels, image.crowd) if not crowd]
        feats = _region_features(model, [p for _, p in batch], fractions, image_size=image_size, region=region, ev=ev)
        for (image, _), part, n_gt in zip(batch, feats.cpu().split([len(f) for f in fractions]), sizes):
            out["gt"].append(part[:n_gt])
            if proposals is not None:
                out["prop"].append(part[n_gt:])
                out["prop_image"] += [image.id] * (len(part) - n_gt)
                out["prop_box"] += proposals[image.id][0]
                out["prop_score"] += proposals[image.id][1]
        batch.clear()

    for image in coco.images:
        try:
            batch.append((image, read_image(image)))
            out["read"].append(image.id)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped and named, never fatal
            out["skipped"].append({"image_id": image.id, "file": str(image.path), "reason": f"{type(e).__name__}: {e}"})
        if len(batch) == ev.batch_size:
            flush()
    if batch:
        flush()
    dim = embed_dim(model.visual)
    for key in ("gt", "prop"):
        out[key] = torch.cat(out[key]) if out[key] else torch.zeros(0, dim)
    return out


def box_accuracy(gt_embed: torch.Tensor, labels: torch.Tensor, class_embed: torch.Tensor) -> dict:
    """Ground-truth boxes classified among the classes -> box_acc1 (box_acc5 with 5 classes
    or more), box_mean_per_class_recall over the classes present, chance and majority_rate."""
    if labels.numel() == 0:
        return {"num_boxes": 0}
    zs = zeroshot_metrics(gt_embed.to(class_embed.dtype), labels, class_embed)
    out = {"box_acc1": zs["acc1"], "box_mean_per_class_recall": zs["mean_per_class_recall"],
           "num_boxes": int(labels.numel()), "chance": zs["chance"], "majority_rate": zs["majority_rate"]}
    if class_embed.shape[0] >= 5:
        out["box_acc5"] = zs["acc5"]
    return out


def label_proposals(prop_embed: torch.Tensor, scores: list[float], class_embed: torch.Tensor) -> tuple[list, list]:
    """Each proposal's best class and its detection score, proposal score x class
    probability (softmax over the classes of PROB_SCALE x cosine) -> (class indices, scores)."""
    if prop_embed.shape[0] == 0:
        return [], []
    prob = (PROB_SCALE * prop_embed.to(class_embed.dtype) @ class_embed.T).softmax(dim=-1)
    best, cls = prob.max(dim=-1)
    return cls.tolist(), (best * torch.tensor(scores, dtype=best.dtype)).tolist()


def coco_ap(dataset: dict, image_ids: list[int], detections: list[dict]) -> dict:
    """COCOeval (bbox, its defaults: at most 100 detections an image, the best-scored) over
    ``image_ids`` -> {"ap50": AP at IoU 0.5, "map": AP over IoU .5:.95}; both 0 with no
    detections, None where those images hold no ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    wanted = set(image_ids)
    if not any(a["image_id"] in wanted for a in dataset["annotations"]):
        return {"ap50": None, "map": None}
    if not detections:
        return {"ap50": 0.0, "map": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        run = COCOeval(gt, gt.loadRes(detections), "bbox")
        run.params.imgIds = list(image_ids)
        run.evaluate(), run.accumulate(), run.summarize()
    return {"ap50": float(run.stats[1]), "map": float(run.stats[0])}


def _detections(feats: dict, coco: CocoSet, class_embed: torch.Tensor) -> list[dict]:
    classes, scores = label_proposals(feats["prop"], feats["prop_score"], class_embed)
    return [{"image_id": iid, "category_id": coco.categories[c][0], "bbox": box, "score": s}
            for iid, box, c, s in zip(feats["prop_image"], feats["prop_box"], classes, scores)]


def evaluate_detection(model: CLIP, text: TextEncoder, ev: EvalConfig, data: str, *, image_size: int,
                       proposals: str | None = None, classnames: str | None = None, templates: str | None = None,
                       region: str = "roi", image_root: str | None = None) -> dict:
    """Zero-shot detection on a COCO-format set (vlm/eval/coco.py) -> {"dataset", "num_images",
    "tasks", "detection": {box accuracies, num_boxes, ap50, map when ``proposals`` is given,
    ...}, "skipped": [{"image_id", "file", "reason"}]}. ``classnames``/``templates`` name and
    prompt the categories as zero-shot classification's files do: the labels are the
    category names, so a class-name file has one line per category in the sorted order of
    their names, and eval.class_names maps a category name to its prompt name. ``region``:
    "roi" or "crop" (module docstring); ``image_root``: where file names are relative to."""
    if region not in REGIONS:
        raise ValueError(f"unknown region features {region!r} ({', '.join(REGIONS)})")
    coco = load_coco(data, image_root)
    props = load_proposals(proposals, coco) if proposals is not None else None
    names = [name for _, name in coco.categories]
    named = resolve_class_names(names, ev, str(data), classnames)
    order = {label: i for i, label in enumerate(named.labels)}
    missing = [n for n in names if n not in order]
    if missing:
        raise ValueError(f"{named.source} names no class for the categories {missing[:5]} of {coco.source}")
    prompts, templates_source = resolve_templates(ev, str(data), templates)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            class_embed = class_embeddings(model, text, [named.names[order[n]] for n in names], prompts).cpu()
            feats = _embed_boxes(model, coco, props, ev, image_size=image_size, region=region)
    finally:
        model.train(was_training)
    result = {**box_accuracy(feats["gt"], torch.tensor(feats["gt_label"], dtype=torch.long), class_embed),
              "num_classes": len(names), "classnames": [named.names[order[n]] for n in names],
              "classnames_source": named.source, "templates": prompts, "templates_source": templates_source,
              "region": region, "features": ev.dense_features if region == "roi" else "image",
              "num_skipped": len(feats["skipped"])}
    if props is not None:
        result.update(coco_ap(coco.dataset, feats["read"], _detections(feats, coco, class_embed)),
                      num_proposals=len(feats["prop_box"]), proposals=str(proposals))
    return {"dataset": str(Path(data)), "num_images": len(coco.images), "tasks": ["detection"],
            "detection": result, "skipped": feats["skipped"]}


def format_detection(results: dict) -> str:
    """The detection results as the lines `vlm eval` prints."""
    d = results["detection"]
    lines = []
    if d.get("num_boxes"):
        top5 = f", top-5 {d['box_acc5']:.4f}" if "box_acc5" in d else ""
        lines.append(f"detection box top-1: {d['box_acc1']:.4f}{top5}, mean per-class recall "
                     f"{d['box_mean_per_class_recall']:.4f} (uniform chance {d['chance']:.4f}, "
                     f"{d['num_boxes']} ground-truth boxes, {d['num_classes']} classes, {d['region']} features)")
    if d.get("ap50") is not None:
        lines.append(f"detection AP@0.5: {d['ap50']:.4f}   mAP@[.5:.95]: {d['map']:.4f} "
                     f"({d['num_proposals']} proposals)")
    for s in results["skipped"]:
        lines.append(f"skipped unreadable image {s['file']}: {s['reason']}")
    return "\n".join(lines)
