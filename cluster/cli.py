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

    model = sub.add_parser("model", help="the registered model presets",
                           description="Model presets are YAML files of model config fields in "
                           "vlm/models/configs/; a run config can copy one into its model section.")
    model = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    p = model.add_parser("list", help="list the registered presets",
                         description="One preset per line: name, image tower, image size, text "
                         "context and parameter count (with a 49408-token vocabulary where the "
                         "preset leaves the vocabulary to the run's tokenizer, marked *).")
    p.set_defaults(func=cmd_model_list)
    p = model.add_parser("info", help="parameter counts and forward FLOPs of one preset",
                         description="Builds the preset on the meta device (no memory, no weights) "
                         "and prints its parameter counts and forward FLOPs per sample (batch 1, full "
                         "image size and text context; a multiply-add counts as 2 FLOPs).")
    p.add_argument("name", metavar="NAME", help="a preset name, as `vlm model list` prints it")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help="text vocabulary size (default: the preset's, else 49408, CLIP's)")
    p.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    p.set_defaults(func=cmd_model_info)
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


def cmd_model_list(args) -> int:
    from vlm.models.registry import describe, get_config, list_presets

    for name in list_presets():
        d = describe(name)
        mark = "" if get_config(name).text.vocab_size else "*"
        print(f"{name:<14} {d['vision_type']:<7} {d['image_size']:>4}px  text {d['context_length']:>3} tokens  "
              f"{d['params_total'] / 1e6:8.2f}M params{mark}")
    print("* vocabulary taken from the run's tokenizer; counted here with 49408 tokens")
    return 0


def cmd_model_info(args) -> int:
    from vlm.models.registry import describe, get_config, list_presets

    if args.name not in list_presets():
        raise ValueError(f"unknown model preset {args.name!r}; known presets: {', '.join(list_presets())}")
    cfg = get_config(args.name)
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ValueError(f"--vocab-size must be positive, not {args.vocab_size}")
    if args.vocab_size is not None:
        cfg = cfg.model_copy(update={"text": cfg.text.model_copy(update={"vocab_size": args.vocab_size})})
    d = describe(cfg)
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"{args.name}: {d['vision_type']} image tower at {d['image_size']}px, text context {d['context_length']}, "
          f"vocabulary {d['vocab_size']}, embedding {d['embed_dim']}")
    print(f"parameters: {d['params_total'] / 1e6:.2f}M total = {d['params_vision'] / 1e6:.2f}M image "
          f"+ {d['params_text'] / 1e6:.2f}M text")
    print(f"forward GFLOPs per sample: {d['flops_total'] / 1e9:.2f} total = {d['flops_vision'] / 1e9:.2f} image "
          f"+ {d['flops_text'] / 1e9:.2f} text (a multiply-add counts as 2 FLOPs; norms and activations not counted)")
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
