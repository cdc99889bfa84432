"""Loading a trained model for evaluation: a run, a checkpoint or an export -> (CLIP, TextEncoder, RunConfig)."""
from __future__ import annotations

import json

from vlm.checkpoint.resolve import resolve, resolve_verified
from vlm.checkpoint.safeload import load_trainer_state
from vlm.config import RunConfig, config_from_dict
from vlm.data.tokenizer import TextEncoder
from vlm.models.clip import CLIP
from vlm.models.registry import build_model
from vlm.train.module import model_state_from_pretrainer


def load_eval_model(path: str, *, verify_files: bool = True) -> tuple[CLIP, TextEncoder, RunConfig]:
    """A run dir, a checkpoint dir (any ZeRO stage: the weights are consolidated) or an
    export from `vlm ckpt export` (*.safetensors) -> (model in eval mode, text encoder,
    its config). A checkpoint is checked against its manifest first, a run's corrupt newest
    one skipped with a warning (resolve_verified); verify_files=False for a
    checkpoint dir its caller has verified already (hashing it again costs a full read)."""
    from vlm.checkpoint.export import consolidated_state, load_export

    if str(path).endswith(".safetensors"):
        tensors, meta = load_export(path)
        tree, tokenizer = json.loads(meta["vlm_config"]), meta["vlm_tokenizer"]
        weights = {k: v for k, v in tensors.items() if not k.startswith("objectives.")}
    else:
        ckpt = resolve_verified(path) if verify_files else resolve(path)
        state = load_trainer_state(ckpt)
        tree, tokenizer = state["config"], state["tokenizer"]
        weights = model_state_from_pretrainer(consolidated_state(ckpt, state))
    cfg = config_from_dict(tree)
    text = TextEncoder.from_json(tokenizer, cfg.model.text.context_length)
    model = build_model(cfg.model, text.vocab_size)
    model.load_state_dict(weights)
    return model.eval(), text, cfg


def load_for_eval(checkpoint: str, eval_overrides: list[str] = ()) -> tuple[str, CLIP, TextEncoder, RunConfig]:
    """`vlm eval`'s model: the checkpoint verified once (an export loads as it is), its model,
    and its config with `--set eval.*` overrides applied. -> (the checkpoint used, model,
    text encoder, config); a bad override is a ConfigError naming it."""
    from pydantic import ValidationError

    from vlm.config import ConfigError, apply_overrides, format_validation_error

    bad = [o for o in eval_overrides if not o.startswith("eval.")]
    if bad:
        raise ConfigError(f"vlm eval --set only takes eval.* keys (got {', '.join(bad)})")
    used = checkpoint if checkpoint.endswith(".safetensors") else str(resolve_verified(checkpoint))
    model, text, cfg = load_eval_model(used, verify_files=False)
    if eval_overrides:
        try:
            cfg = config_from_dict(apply_overrides(cfg.model_dump(mode="json"), list(eval_overrides)))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e)) from None
    return used, model, text, cfg
