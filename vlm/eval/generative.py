"""Evaluation of the generative and alignment parts of a checkpoint, on a shard directory
(the run's held-out shards by default):

- caption: greedy or beam captions (vlm.eval.generate); on labelled data ("{colour} {shape}"
  on the demo corpus), the share of images whose caption names the right first word of the
  label and the right rest (a caption word may be any of the caller's synonyms of a label word);
- itm-rerank: text→image retrieval by contrastive similarity, then the top-k images of
  each caption re-ranked by the image–text matching head; recall@1 before and after;
- box-zeroshot: each sample's ground-truth boxes (metadata "regions") classified among the
  phrases of the dataset by region–word alignment; accuracy against chance.

These need parts that live in the objectives (the ITM head, the region projection), so the
whole pre-trainer (model + objectives) is rebuilt from the checkpoint, not only the CLIP.
What is specific to a dataset (new images to caption, the synonyms of its label words) is
passed in by the caller (cluster/cli/generate.py takes them from demo/)."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from vlm.checkpoint.resolve import resolve_verified
from vlm.checkpoint.safeload import load_trainer_state
from vlm.config import RunConfig, config_from_dict
from vlm.data.batches import decode_image
from vlm.data.pixels import CLIP_MEAN, CLIP_STD
from vlm.eval.generate import caption
from vlm.models.registry import build_model
from vlm.objectives.registry import build_objective
from vlm.train.module import Pretrainer
from vlm.data.tokenizer import TextEncoder

TASKS = ("caption", "itm-rerank", "box-zeroshot")


@dataclass
class Sample:
    key: str
    image: torch.Tensor            # [3, S, S]
    caption: str
    label: str | None
    regions: list[dict] = field(default_factory=list)


def load_pretrainer(path: str) -> tuple[Pretrainer, TextEncoder, RunConfig]:
    """A run dir or a checkpoint dir (any ZeRO stage) -> (model + objectives in eval mode,
    text encoder, config). Checked against its manifest first, a run's corrupt newest
    checkpoint skipped with a warning (resolve_verified)."""
    return _load_verified(resolve_verified(path))


def _load_verified(ckpt: Path) -> tuple[Pretrainer, TextEncoder, RunConfig]:
    from vlm.checkpoint.export import consolidated_state

    state = load_trainer_state(ckpt)
    cfg = config_from_dict(state["config"])
    text = TextEncoder.from_json(state["tokenizer"], cfg.model.text.context_length)
    model = build_model(cfg.model, text.vocab_size)
    width = getattr(model.visual, "pooled_dim", cfg.model.vision.width)
    objectives = [build_objective(o, embed_dim=cfg.model.embed_dim, vision_width=width, model=model,
                                  vocab_size=text.vocab_size, kernels=cfg.kernels) for o in cfg.objectives]
    pretrainer = Pretrainer(model, objectives, [o.weight for o in cfg.objectives])
    pretrainer.load_state_dict(consolidated_state(ckpt, state))
    return pretrainer.eval(), text, cfg


def objective(pretrainer: Pretrainer, name: str):
    found = [o for o in pretrainer.objectives if o.name == name]
    if not found:
        raise ValueError(f"this checkpoint was not trained with objective {name!r} "
                         f"(it has: {', '.join(o.name for o in pretrainer.objectives)})")
    return found[0]


def read_samples(data: str, *, image_size: int, label_template: str, limit: int | None = None,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> list[Sample]:
    """The first `limit` samples of a shard directory, in order, images normalised with `mean`/`std`."""
    from data_pipeline.shards.samples import iter_tar_samples, list_shards

    shards = list_shards(data)
    if not shards:
        raise FileNotFoundError(f"no shards (*.tar) in {data}")
    out = []
    for shard in shards:
        for s in iter_tar_samples(shard):
            meta = s.get("json", {})
            try:
                label = label_template.format(**meta)
            except (KeyError, IndexError):
                label = None
            out.append(Sample(key=s["__key__"], image=decode_image(s, image_size, mean=mean, std=std), caption=s.get("txt", ""),
                              label=label, regions=meta.get("regions") or []))
            if limit and len(out) >= limit:
                return out
    return out


# New images from the caller: (run config, count) -> (image bytes, record) pairs, the record
# holding "key", "caption", "label" and "regions".
ImageSource = Callable[[RunConfig, int], Iterable[tuple[bytes, dict]]]


def generated_samples(cfg: RunConfig, source: ImageSource, count: int) -> list[Sample]:
    """`count` images of `source`, resized as ingestion resizes (cfg.data.ingest) and then
    as the model reads them, with their captions, labels and regions."""
    from PIL import Image

    from data_pipeline.ingest.codec import resize_image

    size = cfg.model.vision.image_size
    out = []
    for data, record in source(cfg, count):
        img = resize_image(Image.open(io.BytesIO(data)).convert("RGB"), cfg.data.ingest.image_size,
                           cfg.data.ingest.resize_mode)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        image = decode_image({"png": buf.getvalue()}, size, mean=cfg.model.vision.image_mean,
                             std=cfg.model.vision.image_std)
        out.append(Sample(key=record["key"], image=image,
                          caption=record["caption"], label=record["label"], regions=record["regions"]))
    return out


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def names_label(text: str, label: str, synonyms: dict[str, tuple[str, ...]]) -> bool:
    """Whether `text` names every word of `label`, each as itself or one of its synonyms."""
    lowered = text.lower()
    return all(any(re.search(rf"\b{re.escape(w)}\b", lowered) for w in synonyms.get(word, (word,)))
               for word in label.lower().split())


def caption_task(pretrainer: Pretrainer, text: TextEncoder, samples: list[Sample], *, beam: int = 1,
                 batch_size: int = 64, synonyms: dict[str, tuple[str, ...]] | None = None) -> dict:
    """Captions every sample; with labels, the share naming the label's words (or synonyms)."""
    synonyms = synonyms or {}
    captions = []
    for chunk in _batches(samples, batch_size):
        captions += caption(pretrainer.model, torch.stack([s.image for s in chunk]), text, beam=beam)
    labelled = [(c, s.label) for c, s in zip(captions, samples) if s.label]
    result = {"num_images": len(samples), "beam": beam,
              "examples": [{"key": s.key, "label": s.label, "reference": s.caption, "caption": c}
                           for s, c in zip(samples, captions)]}
    if labelled:
        colour = [names_label(c, lab.split()[0], synonyms) for c, lab in labelled]
        shape = [names_label(c, " ".join(lab.split()[1:]), synonyms) for c, lab in labelled]
        result.update(colour_and_shape_acc=sum(a and b for a, b in zip(colour, shape)) / len(labelled),
                      colour_acc=sum(colour) / len(labelled), shape_acc=sum(shape) / len(labelled))
    return result


@torch.no_grad()
def _encode(pretrainer: Pretrainer, text: TextEncoder, samples: list[Sample], batch_size: int) -> dict:
    model = pretrainer.model
    parts = {"image_embed": [], "image_tokens": [], "text_embed": [], "text_tokens": [], "eot": []}
    for chunk in _batches(samples, batch_size):
        tokens, eot = text([s.caption for s in chunk])
        out = model(torch.stack([s.image for s in chunk]), tokens, eot)
        for k in ("image_embed", "image_tokens", "text_embed", "text_tokens"):
            parts[k].append(out[k])
        parts["eot"].append(eot)
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def itm_rerank_task(pretrainer: Pretrainer, text: TextEncoder, samples: list[Sample], *, top_k: int = 16,
                    batch_size: int = 64) -> dict:
    """Text→image: caption i's true image is image i. Contrastive similarity ranks all
    images; the ITM head re-scores the contrastive top-k (a true image outside it stays
    missed), ranked by the ITM logit alone and by ITM logit + cosine similarity (BLIP's
    retrieval score, which keeps the contrastive order among pairs the head scores alike)."""
    itm = objective(pretrainer, "itm")
    enc = _encode(pretrainer, text, samples, batch_size)
    n = len(samples)
    k = min(top_k, n)
    sim = enc["text_embed"] @ enc["image_embed"].T  # [T, N]
    top_sim, top = sim.topk(k, dim=1)                # [T, k]
    logits = torch.empty(n, k)
    for rows in _batches(list(range(n)), max(1, batch_size // k)):
        cand = top[rows]
        logits[rows] = itm.match_logits(pretrainer.model, enc["image_tokens"][cand.reshape(-1)],
                                        enc["text_tokens"][rows].repeat_interleave(k, dim=0),
                                        enc["eot"][rows].repeat_interleave(k, dim=0)).view(len(rows), k)
    truth = torch.arange(n)

    def recall1(score: torch.Tensor) -> float:
        return (top.gather(1, score.argmax(dim=1, keepdim=True))[:, 0] == truth).float().mean().item()

    return {"num_captions": n, "top_k": k, "contrastive_recall@1": (top[:, 0] == truth).float().mean().item(),
            "itm_rerank_recall@1": recall1(logits), "itm_plus_contrastive_recall@1": recall1(logits + top_sim),
            f"contrastive_recall@{k}": (top == truth[:, None]).any(1).float().mean().item(),
            "true_pair_itm_prob": torch.sigmoid(logits[hit]).mean().item() if (hit := top == truth[:, None]).any()
            else None}


@torch.no_grad()
def box_zeroshot_task(pretrainer: Pretrainer, text: TextEncoder, samples: list[Sample], *,
                      batch_size: int = 64) -> dict:
    """Every ground-truth box is classified among the distinct phrases of the dataset (the
    classes); chance is 1 / number of phrases."""
    rw = objective(pretrainer, "region_word")
    model = pretrainer.model
    boxed = [s for s in samples if s.regions]
    if not boxed:
        raise ValueError("no sample has 'regions' metadata (boxes and phrases): ingest a table with a "
                         "regions column (demo.tables.write_url_table(..., regions=True))")
    phrases = sorted({r["phrase"] for s in boxed for r in s.regions})
    phrase_embed = F.normalize(model.encode_text(*text(phrases)), dim=-1)
    hits = total = 0
    for chunk in _batches(boxed, batch_size):
        image_tokens = model.visual(torch.stack([s.image for s in chunk]))["tokens"]
        bi = torch.tensor([i for i, s in enumerate(chunk) for _ in s.regions])
        boxes = torch.tensor([[float(v) for v in r["box"]] for s in chunk for r in s.regions])
        target = torch.tensor([phrases.index(r["phrase"]) for s in chunk for r in s.regions])
        logits = rw.alignment_logits(rw.region_embed(image_tokens, boxes, bi), phrase_embed)
        hits += int((logits.argmax(dim=1) == target).sum())
        total += len(target)
    acc = hits / total
    chance = 1.0 / len(phrases)
    return {"num_boxes": total, "num_phrases": len(phrases), "acc1": acc, "chance": chance,
            "times_chance": acc / chance}


GENERATED_COUNT = 600  # images taken from an ImageSource when no limit is given


def evaluate_generative(path: str, *, data: str | None = None, tasks: list[str] | None = None, beam: int = 1,
                        top_k: int = 16, limit: int | None = None, source: ImageSource | None = None,
                        synonyms: dict[str, tuple[str, ...]] | None = None) -> dict:
    """Loads the checkpoint at `path` and runs `tasks` (default: every task its objectives
    support) on `data`: a shard directory (default: the run's eval shards), or, with
    `source`, `limit` (default 600) new images from it (`data` then only names them in the
    results). `synonyms`: label word -> the words a caption may use for it."""
    ckpt = resolve_verified(path)  # once: the result names it without hashing again
    pretrainer, text, cfg = _load_verified(ckpt)
    names = {o.name for o in pretrainer.objectives}
    if not tasks:
        tasks = [t for t, need in zip(TASKS, ("itg", "itm", "region_word")) if need in names]
        if not tasks:
            raise ValueError(f"{path}: none of the objectives itg, itm, region_word was trained")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {', '.join(bad)}; known: {', '.join(TASKS)}")
    data = data or cfg.path(cfg.data.eval_shards)
    if source is not None:
        samples = generated_samples(cfg, source, limit or GENERATED_COUNT)
    else:
        samples = read_samples(data, image_size=cfg.model.vision.image_size,
                               label_template=cfg.eval.label_template, limit=limit,
                               mean=cfg.model.vision.image_mean, std=cfg.model.vision.image_std)
    torch.manual_seed(0)
    results: dict = {"checkpoint": str(ckpt), "data": data}
    if "caption" in tasks:
        results["caption"] = caption_task(pretrainer, text, samples, beam=beam, synonyms=synonyms)
    if "itm-rerank" in tasks:
        results["itm_rerank"] = itm_rerank_task(pretrainer, text, samples, top_k=top_k)
    if "box-zeroshot" in tasks:
        results["box_zeroshot"] = box_zeroshot_task(pretrainer, text, samples)
    return results


def format_generative(results: dict, show: int = 5) -> str:
    lines = [f"checkpoint {results['checkpoint']} on {results['data']}"]
    if "caption" in results:
        c = results["caption"]
        for e in c["examples"][:show]:
            lines.append(f"  [{e['label']}] {e['caption']!r}   (reference: {e['reference']!r})")
        if "colour_and_shape_acc" in c:
            lines.append(f"caption ({'greedy' if c['beam'] == 1 else 'beam ' + str(c['beam'])}, "
                         f"{c['num_images']} images): names colour and shape {c['colour_and_shape_acc']:.3f} "
                         f"(colour {c['colour_acc']:.3f}, shape {c['shape_acc']:.3f})")
    if "itm_rerank" in results:
        r = results["itm_rerank"]
        k = r["top_k"]
        lines.append(f"text->image R@1 over {r['num_captions']} captions: contrastive "
                     f"{r['contrastive_recall@1']:.3f}, ITM re-ranking of the top {k} "
                     f"{r['itm_rerank_recall@1']:.3f}, ITM + contrastive (BLIP's score) "
                     f"{r['itm_plus_contrastive_recall@1']:.3f} (contrastive R@{k} {r['contrastive_recall@%d' % k]:.3f})")
    if "box_zeroshot" in results:
        b = results["box_zeroshot"]
        lines.append(f"zero-shot box classification: {b['acc1']:.3f} over {b['num_boxes']} boxes and "
                     f"{b['num_phrases']} phrases (chance {b['chance']:.3f}, {b['times_chance']:.1f}x chance)")
    return "\n".join(lines)
