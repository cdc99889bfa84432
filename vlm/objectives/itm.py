"""Image–text matching (survey eq. 10) with hard negatives from the batch, as in ALBEF/BLIP.

A binary head on the multimodal encoder's joint feature scores every positive pair, and for
each image one negative text and for each text one negative image, each drawn from the
softmax of the contrastive similarities over the global batch with the positives (every
caption of the same image) excluded. One positive per two negatives: a head that predicts
only the base rate sits at H(1/3) = 0.6365, its initial loss is ln 2."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.distributed import gather_features, gather_labels, world
from vlm.objectives.configs import ITMConfig


BASE_RATE_LOSS = 0.6365141682948128  # binary entropy of 1/3, in nats


def sample_hard_negatives(similarity: torch.Tensor, exclude: torch.Tensor, *, temperature: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """similarity [b, B] (rows: this rank's queries, columns: the global batch), exclude
    [b, B] bool (positives) -> [b] column indices, each drawn from softmax(similarity / T)
    over the columns not excluded. Harder (more similar) negatives are likelier."""
    if bool(exclude.all(dim=1).any()):
        raise ValueError("image-text matching needs at least two distinct images in the global batch "
                         "(every candidate negative of some row is a positive)")
    logits = (similarity / temperature).masked_fill(exclude, float("-inf"))
    probs = F.softmax(logits.float(), dim=1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def itm_loss(*, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [N] (the matching score S before the sigmoid), labels [N] in {0, 1} (p of eq.
    10) -> mean over pairs of -(p log σ(s) + (1-p) log(1-σ(s)))."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class ITM(nn.Module):
    """`uses_model` (runs model.fusion on the pairs) and `batch_coupled` (negatives come from
    the global batch, through vlm.distributed). Being uses_model it runs per micro-batch
    under the gradient cache, so its negatives are drawn from the global micro-batch (all
    ranks' rows of the current micro-batch). Reads batch["image_ids"] when present, so
    that other captions of the same image are not drawn as negatives; without it every row
    is its own image. With exclude_same_label, rows of the same class (batch["labels"]) are
    not drawn either."""
    name = "itm"
    batch_coupled = True
    uses_model = True
    needs = frozenset({"image_embed", "text_embed", "image_tokens", "text_tokens", "image_ids"})

    def __init__(self, cfg: ITMConfig, *, embed_dim: int, vision_width: int, model: nn.Module,
                 vocab_size: int | None = None):
        super().__init__()
        if getattr(model, "fusion", None) is None:
            raise ValueError("objective itm needs a multimodal encoder: set model.fusion (e.g. fusion: {})")
        self.cfg = cfg
        width = model.fusion.width
        self.head = nn.Linear(width, 1)
        nn.init.normal_(self.head.weight, std=0.02 * width ** -0.5)
        nn.init.zeros_(self.head.bias)

    def match_logits(self, model: nn.Module, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                     eot_index: torch.Tensor) -> torch.Tensor:
        """Row-wise pairs [N, P, Wi], [N, L, Wt], [N] -> matching logits [N] (also what
        re-ranking at evaluation scores)."""
        return self.head(model.fusion(image_tokens, text_tokens, eot_index)["cls"])[:, 0]

    def forward(self, outputs: dict, batch: dict, *, model: nn.Module) -> dict[str, torch.Tensor]:
        rank, _ = world()
        image_tokens, text_tokens = outputs["image_tokens"], outputs["text_tokens"]
        eot = batch["eot_index"]
        b = eot.shape[0]
        own = torch.arange(b, device=eot.device) + rank * b
        ids = batch.get("image_ids", own)
        with torch.no_grad():
            all_ids = gather_labels(ids)
            same = ids[:, None] == all_ids[None, :]
            if self.cfg.exclude_same_label:
                if "labels" not in batch:
                    raise ValueError("itm.exclude_same_label needs batch labels: set data.label_field")
                labels = batch["labels"]
                same |= (labels[:, None] == gather_labels(labels)[None, :]) & (labels[:, None] >= 0)
            all_image = gather_labels(outputs["image_embed"].detach())
            all_text = gather_labels(outputs["text_embed"].detach())
            t = self.cfg.negative_temperature
            neg_text = sample_hard_negatives(outputs["image_embed"].detach() @ all_text.T, same, temperature=t)
            neg_image = sample_hard_negatives(outputs["text_embed"].detach() @ all_image.T, same, temperature=t)
        all_image_tokens = gather_features(image_tokens.flatten(1)).view(-1, *image_tokens.shape[1:])
        all_text_tokens = gather_features(text_tokens.flatten(1)).view(-1, *text_tokens.shape[1:])
        all_eot = gather_labels(eot)
        images = torch.cat([image_tokens, image_tokens, all_image_tokens[neg_image]])
        texts = torch.cat([text_tokens, all_text_tokens[neg_text], text_tokens])
        logits = self.match_logits(model, images, texts, torch.cat([eot, all_eot[neg_text], eot]))
        labels = torch.cat([torch.ones(b, device=eot.device), torch.zeros(2 * b, device=eot.device)])
        loss = itm_loss(logits=logits, labels=labels)
        return {self.name: loss, f"{self.name}/accuracy": ((logits > 0).float() == labels).float().mean()}
