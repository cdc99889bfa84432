"""`vlm demo`: the walking skeleton on one machine, every flow with its real component (the recipe is demo.recipe)."""
from __future__ import annotations

from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def add_demo_commands(sub, config_args) -> None:
    p = sub.add_parser("demo", help="generate a corpus, ingest, train, evaluate and report, on this machine",
                       description="The whole system on one machine: a procedural image-caption corpus "
                       "served over HTTP on 127.0.0.1, Ray ingestion into shards, ZeRO-2 training on "
                       "2 Ray Train workers with Prometheus metrics and checkpoints, zero-shot and "
                       "retrieval evaluation on held-out (colour, shape) combinations, and a report. "
                       "The corpus is set in the config file's `demo:` section (--set demo.corpus.num_train=N).")
    config_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run directory of a previous demo first")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from cluster.ray.session import ray_session
    from cluster.ray.train import run_training
    from demo.config import load_demo_config
    from demo.recipe import run

    cfg, demo = load_demo_config(args.config or DEMO_CONFIG, args.overrides)
    return run(cfg, demo, ray_session=ray_session, train=run_training, overwrite=args.overwrite,
               config_path=args.config)
