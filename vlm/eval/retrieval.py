"""Image-text retrieval: recall@k in both directions over every caption of the evaluation set.

Result keys follow CLIP_benchmark: image_retrieval_recall@k (text -> image) and
text_retrieval_recall@k (image -> text)."""
from __future__ import annotations

import torch

from vlm.eval.context import EvalContext


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


def evaluate_retrieval(ctx: EvalContext) -> dict:
    """The retrieval protocol: every caption against every image -> results["retrieval"]."""
    feats = ctx.feats
    return {**retrieval_metrics(feats["image"], feats["text"], feats["text_item"], ctx.ev.recall_at),
            "num_captions": int(feats["text"].shape[0])}
