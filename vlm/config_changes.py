"""Which config keys a resumed run may change, and the differences between a saved config and a new one."""
from __future__ import annotations

import os
from typing import Any

from pydantic import ValidationError

from vlm.config import ConfigError, RunConfig, config_from_dict, drop_legacy_keys, upgrade_saved_tree


# The keys a resumed run may change (`vlm train --resume … --set KEY=VALUE`, a resubmitted
# `vlm cluster submit`), as dotted paths: a path covers every key below it, '*' stands for
# a list index. They steer the run (its length, the learning-rate schedule's shape,
# logging, checkpointing, evaluation, metrics, the number of workers and the batch
# schedule over them), say where its files are, or only concern ingestion or curation. Every other key
# is saved in the checkpoint or gives it its shape (model, objectives, tokenizer, micro
# batch, ZeRO stage, precision, seed, optimizer, augmentation, reader) and must stay as
# the checkpoint has it. optim.lr is not here: the scheduler's base learning rate is
# restored from the checkpoint, so a new one would be silently ignored.
RESUME_CHANGEABLE: tuple[str, ...] = (
    "name", "run_dir", "kernels",
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.checkpoint_dir", "train.num_workers", "train.global_batch_size", "train.grad_accum_steps",
    "train.threads_per_worker", "train.stop_grace_s", "train.max_failures", "train.resize_check_s",
    "optim.warmup_steps", "optim.min_lr_ratio",
    "model.grad_checkpointing", "model.init_from",
    "data.train_shards", "data.eval_shards", "data.reader.mix.*.shards",
    "data.max_bad_sample_ratio", "data.bad_sample_window", "data.ingest", "data.score", "data.filter",
    "data.loader_workers", "data.prefetch_batches",
    "eval", "metrics",
)
_ABSENT = "(absent)"


def config_diff(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf where two config trees (as
    model_dump(mode="json") gives them) differ; lists of sections of the same length are
    compared item by item (objectives.1.weight), anything else as a whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [d for k in keys for d in config_diff(old.get(k, _ABSENT), new.get(k, _ABSENT),
                                                       f"{path}.{k}" if path else str(k))]
    if (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
            and any(isinstance(v, dict) for v in old + new)):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in config_diff(a, b, f"{path}.{i}")]
    return [] if old == new else [(path, old, new)]


def resume_changeable(key: str, allowed: tuple[str, ...] = RESUME_CHANGEABLE) -> bool:
    from fnmatch import fnmatchcase

    return any(fnmatchcase(key, p) or fnmatchcase(key, p + ".*") for p in allowed)


def _as_current(tree: dict) -> dict:
    """A saved config tree as this version dumps it (keys added since get their defaults);
    as saved when it no longer validates."""
    try:
        return config_from_dict(tree).model_dump(mode="json")
    except ValidationError:
        return drop_legacy_keys(upgrade_saved_tree(tree))


def config_changes(saved: dict, cfg: RunConfig,
                   allowed: tuple[str, ...] = RESUME_CHANGEABLE) -> list[tuple[str, Any, Any]]:
    """The differences between a saved config tree and cfg outside the `allowed` keys."""
    return [d for d in config_diff(_as_current(saved), cfg.model_dump(mode="json"))
            if not resume_changeable(d[0], allowed)]


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    def show(v: Any) -> str:
        text = v if v == _ABSENT else repr(v)
        return text if len(text) <= 120 else text[:117] + "..."
    return "\n".join(f"  {key}: {show(old)} → {show(new)}" for key, old, new in changes)


def check_resume_config(saved: dict | None, cfg: RunConfig, *, checkpoint: str | os.PathLike) -> None:
    """ConfigError listing the keys (dotted paths, saved → new) where cfg differs from the
    config `checkpoint` was saved with, other than RESUME_CHANGEABLE: a resume would load
    state of another shape (a raw state_dict mismatch deep in DeepSpeed) or silently train
    on with settings the checkpoint contradicts."""
    changes = config_changes(saved, cfg) if saved else []
    if changes:
        raise ConfigError(
            f"config differs from the checkpoint {checkpoint} in keys a resume cannot change:\n"
            f"{format_changes(changes)}\n"
            f"only these may change on resume: {', '.join(RESUME_CHANGEABLE)} (docs/checkpoints.md); "
            "to start a new run with this config instead, pass --set run_dir=NEW_DIR")
