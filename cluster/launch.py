"""Runs vlm.engine.train on N Ray Train workers (one per GPU, or per CPU slot)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from ray.train import RunConfig as RayRunConfig
from ray.train import ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from vlm.config import RunConfig


def _worker(loop_config: dict) -> None:
    # Runs inside each Ray Train worker, where Ray has created the process group.
    import ray.train

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    os.environ["RANK"] = str(ctx.get_world_rank())
    os.environ["WORLD_SIZE"] = str(ctx.get_world_size())
    for key, value in loop_config["env"].items():
        os.environ.setdefault(key, value)
    os.chdir(loop_config["cwd"])
    from vlm.config import config_from_dict
    from vlm.engine import train

    train(config_from_dict(loop_config["config"]), resume=loop_config["resume"])


def run_training(cfg: RunConfig, *, resume: str | None = None) -> None:
    """Blocks until every worker has finished; raises if the run failed."""
    from cluster.ray_local import worker_env

    use_gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "resume": resume,
                           "cwd": os.getcwd(), "env": worker_env()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=RayRunConfig(name=cfg.name, storage_path=str(Path(cfg.run_dir).resolve() / "ray")),
    )
    trainer.fit()
