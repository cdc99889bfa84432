"""2 gloo processes, each on its half of the batch, give the same loss and gradients as
1 process on the concatenated batch, for every objective. One spawn serves all of them."""

import torch

from vlm.objectives.configs import ClipInfoNCEConfig, SigLIPConfig, SlipImageConfig, UniCLConfig
from vlm.objectives.registry import OBJECTIVES, build_objective

from support.multiproc import run_ranks

RANKS, PER_RANK, E, W = 2, 5, 6, 7
B = RANKS * PER_RANK
CONFIGS = [ClipInfoNCEConfig(init_temperature=0.2), SigLIPConfig(init_temperature=0.2, init_bias=-3.0),
           SlipImageConfig(head_hidden=16, head_dim=8), UniCLConfig(init_temperature=0.2)]
# labels shared across the two halves, and unlabelled rows on both
LABELS = torch.tensor([0, 1, -1, 0, 2, 1, -1, 0, 3, 2])


def global_inputs(cfg):
    """The objective (same parameters on every process) and its global-batch inputs."""
    torch.manual_seed(1)
    obj = build_objective(cfg, embed_dim=E, vision_width=W)
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)
    outputs = {"image_embed": unit(B, E), "text_embed": unit(B, E), "view_pooled": torch.randn(2 * B, W, generator=g)}
    return obj, {k: v for k, v in outputs.items() if k in obj.needs}, {"labels": LABELS}


def rank_rows(key, x, rank):
    """This rank's rows of a global input; view_pooled is [view 1 of all; view 2 of all]."""
    half = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    if key == "view_pooled":
        first, second = x.chunk(2)
        return torch.cat([first[half], second[half]])
    return x[half]


def join_ranks(key, parts):
    if key == "view_pooled":
        return torch.cat([p.chunk(2)[0] for p in parts] + [p.chunk(2)[1] for p in parts])
    return torch.cat(parts)


def loss_and_grads(obj, outputs, batch):
    """The objective's loss with the gradients of its inputs and of its own parameters, as
    numpy arrays (sent by value through the queue, so no shared memory outlives a process)."""
    outputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    loss = obj(outputs, batch)[obj.name]
    loss.backward()
    return (loss.item(), {k: v.grad.numpy() for k, v in outputs.items()},
            {k: p.grad.numpy() for k, p in obj.named_parameters()})


def _rank(rank):
    results = {}
    for cfg in CONFIGS:
        obj, outputs, batch = global_inputs(cfg)
        results[cfg.name] = loss_and_grads(obj, {k: rank_rows(k, v, rank) for k, v in outputs.items()},
                                           {k: rank_rows(k, v, rank) for k, v in batch.items()})
    return results


def test_two_ranks_match_one_process_on_the_global_batch():
    # every objective that reads only model outputs must be added here (those running the
    # model themselves have their distributed checks in tests/multiproc/test_generative_distributed.py)
    assert [c.name for c in CONFIGS] == [n for n, c in OBJECTIVES.items() if not getattr(c, "uses_model", False)]
    per_rank = dict(enumerate(run_ranks(_rank, RANKS)))  # raises unless every rank exits 0
    for rank, got in per_rank.items():
        assert isinstance(got, dict), f"rank {rank} failed:\n{got}"

    for cfg in CONFIGS:
        loss, input_grads, param_grads = loss_and_grads(*global_inputs(cfg))
        ranks = [per_rank[r][cfg.name] for r in range(RANKS)]
        # the mean of the per-rank losses is the global loss
        assert abs(sum(r[0] for r in ranks) / RANKS - loss) <= 1e-6 * abs(loss), cfg.name
        # each rank's loss is a mean over 1/RANKS of the rows, so its input gradients are its
        # rows of the global gradient times RANKS
        for key, expected in input_grads.items():
            got = join_ranks(key, [torch.from_numpy(r[1][key]) for r in ranks]) / RANKS
            assert torch.allclose(got, torch.from_numpy(expected), atol=1e-6), (cfg.name, key)
        # DeepSpeed averages parameter gradients over ranks
        for key, expected in param_grads.items():
            got = sum(torch.from_numpy(r[2][key]) for r in ranks) / RANKS
            assert torch.allclose(got, torch.from_numpy(expected), atol=1e-6), (cfg.name, key)
