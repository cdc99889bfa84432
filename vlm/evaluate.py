"""Zero-shot classification and image–text retrieval (survey 2.3.1).

Result keys follow CLIP_benchmark where they overlap: acc1, acc5, mean_per_class_recall,
image_retrieval_recall@k (text -> image) and text_retrieval_recall@k (image -> text)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline.reader import iter_tar_samples, list_shards
from vlm import checkpoint
from vlm.config import RunConfig, config_from_dict
from vlm.data import decode_image
from vlm.models import CLIP, build_clip
from vlm.pretrain import model_state_from_pretrainer
from vlm.tokenizer import TextEncoder


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
            "chance": 1.0 / class_embed.shape[0]}


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


def load_eval_model(path: str) -> tuple[CLIP, TextEncoder, RunConfig]:
    """A run dir or a checkpoint dir -> (model in eval mode, text encoder, its config)."""
    ckpt = checkpoint.resolve(path)
    state = checkpoint.load_trainer_state(ckpt)
    cfg = config_from_dict(state["config"])
    text = TextEncoder.from_json(state["tokenizer"], cfg.model.text.context_length)
    model = build_clip(cfg.model, text.vocab_size)
    model.load_state_dict(model_state_from_pretrainer(checkpoint.load_module_weights(ckpt)))
    return model.eval(), text, cfg


@torch.no_grad()
def embed_shards(model: CLIP, text: TextEncoder, shards_dir: str, *, image_size: int,
                 label_template: str, batch_size: int) -> dict:
    images, captions, labels = [], [], []
    image_chunks, text_chunks = [], []

    def flush():
        if images:
            image_chunks.append(model.encode_image(torch.stack(images)))
            text_chunks.append(model.encode_text(*text(captions)))
            images.clear(), captions.clear()

    for shard in list_shards(shards_dir):
        for sample in iter_tar_samples(shard):
            images.append(decode_image(sample, image_size))
            captions.append(sample.get("txt", ""))
            meta = sample.get("json", {})
            try:
                labels.append(label_template.format(**meta))
            except KeyError as e:
                raise ValueError(f"eval.label_template {label_template!r} needs metadata field {e} "
                                 f"missing from sample {sample['__key__']} in {shard}") from None
            if len(images) == batch_size:
                flush()
    flush()
    return {"image": torch.cat(image_chunks), "text": torch.cat(text_chunks), "labels": labels}


@torch.no_grad()
def class_embeddings(model: CLIP, text: TextEncoder, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """Each class: mean of its normalised prompt embeddings, renormalised -> [C, E]."""
    out = []
    for name in classnames:
        emb = model.encode_text(*text([t.format(name) for t in templates]))
        out.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(out)


def evaluate(path: str, shards_dir: str, *, tasks: tuple[str, ...] = ("zeroshot", "retrieval"),
             cfg_override: RunConfig | None = None) -> dict:
    model, text, cfg = load_eval_model(path)
    ev = (cfg_override or cfg).eval
    data = embed_shards(model, text, shards_dir, image_size=cfg.model.vision.image_size,
                        label_template=ev.label_template, batch_size=ev.batch_size)
    results: dict = {"checkpoint": str(checkpoint.resolve(path)), "dataset": shards_dir,
                     "num_images": len(data["labels"])}
    if "zeroshot" in tasks:
        classes = sorted(set(data["labels"]))
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[c] for c in data["labels"]])
        zs = zeroshot_metrics(data["image"], labels, class_embeddings(model, text, classes, ev.prompt_templates))
        results["zeroshot"] = {**zs, "classnames": classes}
    if "retrieval" in tasks:
        n = data["image"].shape[0]
        results["retrieval"] = retrieval_metrics(data["image"], data["text"], torch.arange(n), ev.recall_at)
    return results


def format_results(results: dict) -> str:
    lines = []
    zs = results.get("zeroshot")
    if zs:
        lines.append(f"zero-shot top-1: {zs['acc1']:.4f} (chance {zs['chance']:.4f}, "
                     f"{zs['num_classes']} held-out classes)")
        lines.append(f"zero-shot top-5: {zs['acc5']:.4f}   mean per-class recall: {zs['mean_per_class_recall']:.4f}")
    rt = results.get("retrieval")
    if rt:
        ks = sorted({int(k.split("@")[1]) for k in rt})
        lines.append("image->text recall@" + "/".join(map(str, ks)) + ": " +
                     " / ".join(f"{rt[f'text_retrieval_recall@{k}']:.4f}" for k in ks))
        lines.append("text->image recall@" + "/".join(map(str, ks)) + ": " +
                     " / ".join(f"{rt[f'image_retrieval_recall@{k}']:.4f}" for k in ks))
    return "\n".join(lines)
