"""Image-text matching draws its hard negatives from the global batch: 2 gloo processes, each
on its half, give the same loss and gradients (inputs, head and fusion encoder) as one
process on the whole batch. A near-zero sampling temperature makes the draw the argmax, so
the two runs draw the same negatives; one image shared by the halves checks the exclusion."""

import torch

from vlm.models.config import ModelConfig
from vlm.models.registry import build_model
from vlm.objectives.configs import ITMConfig
from vlm.objectives.registry import build_objective

from support.multiproc import run_ranks

RANKS, PER_RANK = 2, 3
B = RANKS * PER_RANK
IDS = torch.tensor([0, 1, 2, 0, 3, 4])  # rows 0 and 3, on different ranks, are one image
KEYS = ("image_embed", "text_embed", "image_tokens", "text_tokens")


def build():
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=8, vision={"image_size": 8, "patch_size": 4, "width": 16, "depth": 1, "heads": 2},
                      text={"context_length": 5, "width": 12, "depth": 1, "heads": 2},
                      fusion={"width": 16, "depth": 1, "heads": 2})
    model = build_model(cfg, vocab_size=20)
    obj = build_objective(ITMConfig(negative_temperature=1e-4), embed_dim=8, vision_width=16, model=model,
                          vocab_size=20)
    g = torch.Generator().manual_seed(1)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)
    outputs = {"image_embed": unit(B, 8), "text_embed": unit(B, 8), "image_tokens": torch.randn(B, 4, 16, generator=g),
               "text_tokens": torch.randn(B, 5, 12, generator=g)}
    batch = {"eot_index": torch.tensor([2, 4, 3, 1, 4, 2]), "image_ids": IDS}
    return model, obj, outputs, batch


def loss_and_grads(model, obj, outputs, batch):
    outputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    loss = obj(outputs, batch, model=model)["itm"]
    loss.backward()
    params = {f"head.{k}": p.grad for k, p in obj.named_parameters()}
    params.update({f"fusion.{k}": p.grad for k, p in model.fusion.named_parameters()})
    return loss.item(), {k: outputs[k].grad.numpy() for k in ("image_tokens", "text_tokens")}, \
        {k: v.numpy() for k, v in params.items()}


def _rank(rank):
    model, obj, outputs, batch = build()
    half = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return loss_and_grads(model, obj, {k: v[half] for k, v in outputs.items()},
                          {k: v[half] for k, v in batch.items()})


def test_itm_on_two_ranks_matches_one_process_on_the_global_batch():
    torch.set_num_threads(1)
    per_rank = dict(enumerate(run_ranks(_rank, RANKS)))
    for rank, got in per_rank.items():
        assert isinstance(got, tuple), f"rank {rank} failed:\n{got}"
    loss, input_grads, param_grads = loss_and_grads(*build())
    ranks = [per_rank[r] for r in range(RANKS)]
    assert abs(sum(r[0] for r in ranks) / RANKS - loss) <= 1e-5 * abs(loss)
    for key, expected in input_grads.items():
        got = torch.cat([torch.from_numpy(r[1][key]) for r in ranks]) / RANKS
        assert torch.allclose(got, torch.from_numpy(expected), atol=1e-6), key
    for key, expected in param_grads.items():
        got = sum(torch.from_numpy(r[2][key]) for r in ranks) / RANKS
        assert torch.allclose(got, torch.from_numpy(expected), atol=1e-6), key
