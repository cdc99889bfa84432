"""The DeepSpeed config dict of a run: batch sizes, ZeRO stage and offload, precision, clipping."""
from __future__ import annotations

from vlm.config import RunConfig


def deepspeed_config(cfg: RunConfig, world_size: int, on_gpu: bool, *, load_universal: bool = False) -> dict:
    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and on_gpu)
    accum = t.accum_steps(world_size)
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # offload with the run's own torch AdamW (DeepSpeedCPUAdam needs a compiled op)
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16},
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
