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

    from cluster.cli.data import add_data_commands
    from cluster.cli.generate import add_generate_commands
    from cluster.cli.ckpt import add_ckpt_commands
    from cluster.cli.cluster import add_cluster_commands

    add_data_commands(sub, _config_args)
    add_generate_commands(sub, _config_args)
    add_ckpt_commands(sub, _config_args)
    add_cluster_commands(sub, _config_args)

    p = sub.add_parser("train", help="train on Ray Train workers with DeepSpeed ZeRO",
                       description="Starts train.num_workers Ray Train workers; each runs the DeepSpeed "
                       "engine over its share of data.train_shards, exports Prometheus metrics and "
                       "writes checkpoints into run_dir/checkpoints.")
    _config_args(p, required=True)
    p.add_argument("--resume", metavar="TAG", help="'latest' or a checkpoint tag in run_dir/checkpoints")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: a local instance)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="zero-shot, retrieval, linear-probe and dense evaluation of a checkpoint",
                       description="Evaluates a checkpoint's model on a webdataset shard directory (classes "
                       "from eval.label_template over each sample's metadata, masks from 'mask.png' "
                       "entries), an image folder (one sub-folder per class; NAME.mask.png beside an "
                       "image is its mask) or a CSV with columns path and caption and/or label, and "
                       "optionally mask (paths relative to the CSV; rows sharing a path are one image "
                       "with several captions). Settings come from the checkpoint's eval section, "
                       "overridable with --set eval.KEY=VALUE. Zero-shot class names, first of: "
                       "--classnames, eval.class_names (a {label: name} mapping), classnames.txt "
                       "beside the data (in the folder root or shard directory, or next to the CSV), "
                       "else the label with underscores as spaces. Templates, first of: --templates, "
                       "eval.prompt_templates, zeroshot_classification_templates.txt beside the data, "
                       "else built-in ones.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a run directory, a checkpoint directory or an export from `vlm ckpt export` (*.safetensors)")
    p.add_argument("--data", metavar="PATH",
                   help="shard directory, image folder or .csv (default: the run's data.eval_shards)")
    p.add_argument("--task", action="append", choices=["zeroshot", "retrieval", "linear-probe", "dense"],
                   help="repeatable; default every task the data supports")
    p.add_argument("--probe-train", metavar="PATH",
                   help="train the linear probe on this dataset (at most eval.probe_max_train items) and "
                   "test it on all of --data; default: alternate halves of each class of --data")
    p.add_argument("--classnames", metavar="FILE",
                   help="zero-shot class names, one a line (CLIP_benchmark's classnames.txt): line i "
                   "names the i-th label value in sorted order (the i-th sub-folder of an image "
                   "folder); when every label is an integer, line i+1 names label i")
    p.add_argument("--templates", metavar="FILE",
                   help="zero-shot prompt templates, one a line, {c} marking the class name "
                   "(CLIP_benchmark's zeroshot_classification_templates.txt)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="override an eval setting of the checkpoint's config (repeatable)")
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

    p = sub.add_parser("monitor", help="a local Prometheus server scraping one run's workers",
                       description="Writes RUN_DIR/monitor/prometheus.yml (file_sd over the targets the "
                       "run's workers announce in RUN_DIR/metrics/targets/, the alert rules of "
                       "deploy/prometheus/alerts.yml), starts the `prometheus` binary on 127.0.0.1 with "
                       "its database in RUN_DIR/monitor/data, prints its URL and serves until Ctrl-C.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (cfg.run_dir)")
    p.add_argument("--port", type=int, default=9090, metavar="N", help="listen port (default 9090; 0: any free)")
    p.add_argument("--scrape-interval", default="2s", metavar="DURATION", help="scrape interval (default 2s)")
    p.add_argument("--for", dest="duration", type=float, metavar="SECONDS",
                   help="stop after this many seconds instead of waiting for Ctrl-C")
    p.add_argument("--enable-lifecycle", action="store_true",
                   help="serve Prometheus' /-/reload and /-/quit (off by default: anyone who can reach "
                   "the port could reload or stop the server, without authentication)")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("report", help="PNG and HTML charts of a run",
                       description="Reads RUN_DIR/train_log.jsonl and, when present, RUN_DIR/eval_log.jsonl; "
                       "writes report.png (loss per objective, throughput, data-wait share, evaluation "
                       "figures over steps) and a self-contained report.html.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (cfg.run_dir)")
    p.add_argument("--output", metavar="DIR", help="where to write them (default: RUN_DIR)")
    p.set_defaults(func=cmd_report)
    return parser


def cmd_train(args) -> int:
    from cluster.preflight import check_train

    cfg = load_config(args.config, args.overrides)
    # batch, checkpoint, resumed config and run directory: refused here, naming the key or
    # file, before Ray is imported (a remote checkpoint is left to the workers, which check it)
    check_train(cfg, args.resume)
    from cluster.ray.train import run_supervised
    from cluster.ray.session import ray_session
    from vlm.data.tokenizer import prepare_tokenizer

    if not args.resume:
        prepare_tokenizer(cfg)
    with ray_session(args.ray_address, num_cpus=max(cfg.train.num_workers, 1)):
        # SIGTERM/SIGINT: the workers save and end; a worker that dies: the group restarts
        status = run_supervised(cfg, name=cfg.name, resume=args.resume, max_failures=cfg.train.max_failures)
    print(f"run directory: {cfg.run_dir}")
    return status


def cmd_eval(args) -> int:
    from pydantic import ValidationError

    from vlm.config import apply_overrides, config_from_dict, format_validation_error
    from vlm.eval.runner import evaluate_model, format_results, load_eval_model

    for flag, file in (("--classnames", args.classnames), ("--templates", args.templates)):
        if file is not None and not os.path.isfile(file):
            raise ConfigError(f"vlm eval {flag}: {file} is not a file")
    used = args.checkpoint
    if not used.endswith(".safetensors"):  # verified once here, so the results name the checkpoint used
        from vlm.checkpoint.store import resolve_verified

        used = str(resolve_verified(args.checkpoint))
    model, text, cfg = load_eval_model(used, verify_files=False)
    if args.overrides:
        bad = [o for o in args.overrides if not o.startswith("eval.")]
        if bad:
            raise ConfigError(f"vlm eval --set only takes eval.* keys (got {', '.join(bad)})")
        try:
            cfg = config_from_dict(apply_overrides(cfg.model_dump(mode="json"), args.overrides))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e)) from None
    data = args.data or cfg.path(cfg.data.eval_shards)
    results = evaluate_model(model, text, cfg.eval, data, image_size=cfg.model.vision.image_size,
                             tasks=args.task, probe_train=args.probe_train, classnames=args.classnames,
                             templates=args.templates)
    results = {"checkpoint": used, **results}
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


def cmd_monitor(args) -> int:
    from vlm.observe.monitor import run_monitor

    return run_monitor(args.run_dir, port=args.port, scrape_interval=args.scrape_interval, duration=args.duration,
                       enable_lifecycle=args.enable_lifecycle)


def cmd_report(args) -> int:
    from vlm.observe.report import write_report

    png, page = write_report(args.run_dir, args.output)
    print(f"report: {page}\ncharts: {png}")
    return 0


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def cmd_demo(args) -> int:
    from cluster.cli.demo import run_demo

    cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
    return run_demo(cfg, overwrite=args.overwrite, config_path=args.config)


def _with_path(e: Exception) -> str:
    """The message, with the file an OSError names when the message itself does not."""
    names = [n for n in (getattr(e, "filename", None), getattr(e, "filename2", None)) if n is not None]
    missing = [str(n) for n in names if str(n) not in str(e)]
    return f"{e} ({', '.join(missing)})" if missing else str(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Both decide Ray settings that Ray reads when it is imported: before any import of ray.
    if getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS"):
        from cluster.ray.session import use_cluster_token_if_present
        use_cluster_token_if_present()
    else:
        from cluster.ray.loopback import use_loopback_only
        use_loopback_only()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"vlm: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # OSError: FileNotFoundError, PermissionError, ConnectionError...
        print(f"vlm: error: {_with_path(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
