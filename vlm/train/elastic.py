"""Elastic runs (train.num_workers: [min, max]): what a restart at another world size tells
the user. The global batch is kept by recomputing gradient accumulation at each size
(TrainConfig.accum_steps); the reader re-splits the rest of the epoch over the new ranks
(vlm.data.loader) and DeepSpeed's universal checkpoint carries the optimizer state."""
from __future__ import annotations

from vlm.config import RunConfig, TrainConfig


def resize_line(state: dict, cfg: RunConfig, world_size: int) -> str | None:
    """The log line of a resume at another world size than the checkpoint's, naming both
    sizes, the step, and what happened to gradient accumulation and the global batch;
    None at the same size."""
    old_size = state["world_size"]
    if old_size == world_size:
        return None
    accum = cfg.train.accum_steps(world_size)
    batch = cfg.train.micro_batch_size * accum * world_size
    line = f"resize: world size {old_size} -> {world_size} at step {state['step']}: "
    try:
        old_train = TrainConfig.model_validate((state.get("config") or {}).get("train", {}))
        old_accum = old_train.accum_steps(old_size)
    except ValueError:  # a checkpoint whose config this version cannot read: the new side only
        return line + f"gradient accumulation {accum} per worker, global batch {batch}"
    old_batch = old_train.micro_batch_size * old_accum * old_size
    kept = (f"global batch {batch} unchanged" if batch == old_batch else
            f"global batch {old_batch} -> {batch} (set train.global_batch_size to keep it)")
    return line + f"gradient accumulation {old_accum} -> {accum} per worker, {kept}"
