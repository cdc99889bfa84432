"""The gradient cache (GradCache, Gao et al. 2021) inside a DeepSpeed step.

A batch-coupled loss (InfoNCE, SigLIP, UniCL) scores every sample against the whole
global batch, so its batch size is bounded by the activations that fit, not by the
contrastive quality one wants. The cache splits the step in three passes:

1. no-grad forward of every micro-batch, keeping only the embeddings the coupled
   objectives read (O(global batch × embed dim) memory), and each micro-batch's RNG state;
2. the coupled losses on the global batch of embeddings (every rank's rows, through
   vlm.distributed.gather_features as in a plain step), differentiated with respect to the
   embeddings and the objectives' own parameters: the cached gradients;
3. each micro-batch re-run with gradients under its saved RNG state (dropout, drop-path and
   random masks are bitwise the same as in pass 1), back-propagated with the surrogate
   sum(embedding · cached gradient), plus its per-sample objectives, through
   `engine.backward` so DeepSpeed accumulates the micro-batches as usual.

The objectives' own parameters (temperature, SigLIP bias, heads) get their whole-batch
gradient from pass 2 too, and each replay adds sum(parameter · cached gradient), so every
parameter receives a gradient in every micro-batch as in a plain step. Scaling: DeepSpeed
divides each micro-batch's loss by gradient_accumulation_steps; the replay multiplies the
embeddings' surrogate by the same number (and the parameters' term sums to one over the
micro-batches), so the accumulated gradient is that of the whole-batch loss, exactly,
not the per-micro-batch average that OpenCLIP's variant is disputed for (#761).

Why this works under DeepSpeed where public implementations break (VLM2Vec #70,
tevatron #206): the model runs only through the engine's own forward (ZeRO-3 gathers
its partitioned parameters in forward hooks), the coupled pass touches only the
objectives' parameters, gathered explicitly and past every DeepSpeed hook, and every
backward that counts goes through engine.backward, with the engine's accumulation
boundary at the last micro-batch. Under ZeRO 0 and 1 gradients are reduced once per step, at that
boundary; under ZeRO 2 and 3 DeepSpeed reduce-scatters each micro-batch's gradients into
its partitions as they are produced (its design, with or without this cache)."""
from __future__ import annotations

import torch

from vlm.checkpoint.rng import set_torch_rng_state, torch_rng_state
from vlm.train.module import Pretrainer, gathered


def _concat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _embed(engine, batches: list[dict]) -> tuple[list, list[dict]]:
    """Pass 1: each micro-batch's RNG state, then its embeddings, no graph kept."""
    snapshots, embedded = [], []
    with torch.no_grad():
        for b in batches:
            snapshots.append(torch_rng_state())
            embedded.append({k: v.detach() for k, v in engine(b, mode="embed").items()})
    return snapshots, embedded


def _coupled_gradients(module: Pretrainer, whole: dict, whole_batch: dict) -> tuple[dict, dict, dict]:
    """Pass 2: the coupled losses on the global batch and their gradient w.r.t. the embeddings
    and the objectives' own parameters -> (the embeddings' gradients, the parameters'
    gradients by name, the coupled losses). Neither through engine.forward (it hooks its
    outputs so that their backward counts as a micro-batch's) nor through the modules'
    __call__ (ZeRO-3's module hooks would do their backward bookkeeping for a backward
    that is not one): the objectives' forward directly, their parameters gathered."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in whole.items()}
    params = module.coupled_parameters()
    keys = list(leaves)
    with gathered([p for _, p in params]):
        coupled = module.losses(leaves, whole_batch, module.coupled, hooks=False)
        wrt = [leaves[k] for k in keys] + [p for _, p in params]
        g = torch.autograd.grad(coupled["loss"], wrt)
    grads = dict(zip(keys, g[:len(keys)]))
    param_grads = {name: gp.detach().clone() for (name, _), gp in zip(params, g[len(keys):])}
    return grads, param_grads, coupled


def _detached(v):
    return v.detach() if isinstance(v, torch.Tensor) else v


def cached_step(engine, batches: list[dict[str, torch.Tensor]], *, keep_embeddings: bool = False) -> dict:
    """Accumulates one optimizer step's gradients over `batches` (this rank's micro-batches,
    already on the engine's device) with the gradient cache. Calls engine.step() after every
    micro-batch but the last; the caller takes the final engine.step() (so it can read the
    reduced gradients first). Returns the step's losses (floats: the coupled losses of the
    global batch, the per-sample ones averaged over micro-batches) and, with
    keep_embeddings, the embeddings of both passes for checks ("embed" and "replay")."""
    module: Pretrainer = engine.module
    n = len(batches)
    if engine.gradient_accumulation_steps() != n:
        raise ValueError(f"the engine accumulates {engine.gradient_accumulation_steps()} micro-batches "
                         f"per step, the gradient cache was given {n}")
    if not module.coupled:
        raise ValueError("the gradient cache needs at least one batch-coupled objective")

    # 1. embeddings of every micro-batch, no graph kept
    snapshots, embedded = _embed(engine, batches)
    after_embedding = torch_rng_state()
    whole = {k: torch.cat([e[k] for e in embedded]) for k in module.coupled_keys}
    whole_batch = _concat(batches)

    # 2. the coupled losses on the global batch and their gradient w.r.t. the embeddings
    # and the objectives' own parameters
    grads, param_grads, coupled = _coupled_gradients(module, whole, whole_batch)
    # values stay tensors (on the device): reading them would wait for it; the trainer reads when it logs
    record = {k: v.detach() for k, v in coupled.items() if v is not None and "/" not in k and k != "loss"}
    diagnostics = {k: _detached(v) for k, v in coupled.items() if "/" in k}
    total = coupled["loss"].detach()

    # 3. replay each micro-batch with gradients and its cached gradient
    replayed, per_sample = [], {}
    start = 0
    for i, b in enumerate(batches):
        rows = (start, start + len(b["tokens"]))
        start = rows[1]
        set_torch_rng_state(snapshots[i])
        mine = {k: v[rows[0]:rows[1]] for k, v in grads.items()}
        out = engine(b, mode="replay", n_micro=n, grads=mine, param_grads=param_grads, keep_outputs=keep_embeddings)
        if keep_embeddings:
            replayed.append({k: v.detach() for k, v in out.pop("_outputs").items()})
        part = out.pop("_per_sample_total")
        if part is not None:
            total = total + _detached(part) / n
        for k, v in out.items():
            if k == "loss" or v is None:
                continue
            if "/" in k:
                diagnostics[k] = _detached(v)
            else:
                per_sample[k] = per_sample.get(k, 0.0) + v.detach() / n
        engine.backward(out["loss"])
        if i < n - 1:
            engine.step()
    set_torch_rng_state(after_embedding)
    result = {"losses": {**record, **per_sample}, "diagnostics": diagnostics, "total": total}
    if keep_embeddings:
        result["embed"], result["replay"] = embedded, replayed
    return result

