"""The `vlm` command: the composition root wiring data_pipeline, vlm and cluster together."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vlm.config import ConfigError, load_config


def _config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, metavar="FILE",
                   help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value, e.g. --set train.steps=100 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm", description="Distributed pretraining of CLIP-family vision-language models: "
        "Ray ingestion into webdataset shards, DeepSpeed ZeRO training on Ray Train, "
        "Prometheus metrics, sharded checkpoints, zero-shot evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="generate a corpus, ingest, train, evaluate and report, on this machine",
                       description="The whole system on one machine: a procedural image-caption corpus "
                       "served over HTTP on 127.0.0.1, Ray ingestion into shards, ZeRO-2 training on "
                       "2 Ray Train workers with Prometheus metrics and checkpoints, zero-shot and "
                       "retrieval evaluation on held-out (colour, shape) combinations, and a report.")
    _config_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run directory of a previous demo first")
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="data pipeline commands").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND")
    p = data.add_parser("ingest", help="download and filter a URL+caption table into webdataset shards",
                        description="Cuts the table into shards of data.ingest.shard_size rows, one Ray "
                        "task per shard; writes {id}.tar, {id}.parquet and {id}_stats.json (last) per "
                        "shard; a rerun skips committed shards.")
    p.add_argument("--input", required=True, metavar="TABLE", help="parquet, csv or jsonl; local path or s3://")
    p.add_argument("--output", required=True, metavar="DIR", help="shard directory; local path or s3://")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: a local instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _config_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", help="train on Ray Train workers with DeepSpeed ZeRO",
                       description="Starts train.num_workers Ray Train workers; each runs the DeepSpeed "
                       "engine over its share of data.train_shards, exports Prometheus metrics and "
                       "writes checkpoints into run_dir/checkpoints.")
    _config_args(p, required=True)
    p.add_argument("--resume", metavar="TAG", help="'latest' or a checkpoint tag in run_dir/checkpoints")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: a local instance)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="zero-shot classification and retrieval of a checkpoint",
                       description="Embeds the images and captions of a shard directory with a "
                       "checkpoint's model; zero-shot classes come from eval.label_template over "
                       "each sample's metadata.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a run directory or a checkpoint directory")
    p.add_argument("--data", metavar="DIR", help="shard directory (default: the run's data.eval_shards)")
    p.add_argument("--task", action="append", choices=["zeroshot", "retrieval"],
                   help="repeatable; default both")
    p.add_argument("--output", metavar="JSON", help="also write the results here")
    p.set_defaults(func=cmd_eval)
    return parser


def cmd_ingest(args) -> int:
    from cluster.ray_local import ray_session
    from data_pipeline.ingest import ingest

    cfg = load_config(args.config, args.overrides)
    with ray_session(args.ray_address):
        summary = ingest(args.input, args.output, cfg.data.ingest, progress=not args.no_progress)
    print(summary.format())
    return 0


def prepare_tokenizer(cfg) -> None:
    from pathlib import Path

    from vlm.engine import TOKENIZER_FILE
    from vlm.tokenizer import ensure_tokenizer

    path = Path(cfg.run_dir) / TOKENIZER_FILE
    if ensure_tokenizer(cfg.path(cfg.data.train_shards), path, vocab_size=cfg.tokenizer.vocab_size,
                        min_frequency=cfg.tokenizer.min_frequency):
        print(f"trained a BPE tokenizer on the training captions: {path}")


def cmd_train(args) -> int:
    from cluster.launch import run_training
    from cluster.ray_local import ray_session

    cfg = load_config(args.config, args.overrides)
    if not args.resume:
        latest = Path(cfg.run_dir) / "checkpoints" / "latest"
        if latest.is_file():
            raise FileExistsError(f"{cfg.run_dir} already has checkpoints (newest: {latest.read_text().strip()}): "
                                  f"pass --resume latest to continue it, or --set run_dir=NEW_DIR to start over")
        prepare_tokenizer(cfg)
    with ray_session(args.ray_address, num_cpus=max(cfg.train.num_workers, 1)):
        run_training(cfg, resume=args.resume)
    print(f"run directory: {cfg.run_dir}")
    return 0


def cmd_eval(args) -> int:
    from vlm.evaluate import evaluate, format_results, load_eval_model

    tasks = tuple(args.task or ("zeroshot", "retrieval"))
    data = args.data
    if data is None:
        _, _, cfg = load_eval_model(args.checkpoint)
        data = cfg.path(cfg.data.eval_shards)
    results = evaluate(args.checkpoint, data, tasks=tasks)
    print(format_results(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def cmd_demo(args) -> int:
    from cluster.demo import run_demo

    cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
    return run_demo(cfg, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS")):
        from data_pipeline.local_ray import use_loopback_only
        use_loopback_only()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"vlm: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"vlm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
