"""`vlm train`: its arguments, checked before Ray starts, then a supervised Ray Train run."""
from __future__ import annotations

from vlm.config import load_config


def add_train_commands(sub, config_args) -> None:
    p = sub.add_parser("train", help="train on Ray Train workers with DeepSpeed ZeRO",
                       description="Starts train.num_workers Ray Train workers; each runs the DeepSpeed "
                       "engine over its share of data.train_shards, exports Prometheus metrics and "
                       "writes checkpoints into run_dir/checkpoints. run_dir may be a URL "
                       "(s3://bucket/run, credentials and endpoint from the AWS variables): the "
                       "tokenizer, config, logs, metrics targets and checkpoints then go to the bucket, "
                       "scratch files to the temp dir, nothing to the working directory.")
    config_args(p, required=True)
    p.add_argument("--resume", metavar="TAG", help="'latest' or a checkpoint tag in run_dir/checkpoints")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: a local instance)")
    p.set_defaults(func=cmd_train)


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
    with ray_session(args.ray_address, num_cpus=cfg.train.worker_range()[1]):
        # SIGTERM/SIGINT: the workers save and end; a worker that dies: the group restarts
        status = run_supervised(cfg, name=cfg.name, resume=args.resume, max_failures=cfg.train.max_failures)
    print(f"run directory: {cfg.run_dir}")
    return status
