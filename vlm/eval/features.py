"""Embedding an evaluation set across ranks: each rank's share, then the whole set gathered in item order."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm.config import EvalConfig
from vlm.data.tokenizer import TextEncoder
from vlm.distributed import gather_objects
from vlm.data.pixels import normalise, tower_norm
from vlm.eval.datasets import EvalItem, iter_items, load_image, load_mask
from vlm.eval.dense import confusion, patch_features, predict_mask
from vlm.models.clip import CLIP


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
        images = normalise(torch.stack([load_image(item, image_size) for item in batch]), *tower_norm(model.visual))
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


def gather_shares(share: dict, world_size: int) -> dict:
    """Every rank's share -> the whole set in item order, identical on every rank."""
    if world_size == 1:
        parts = [share]
    else:
        parts = gather_objects(share)
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
