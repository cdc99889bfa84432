"""The `vlm` command: the composition root assembling one parser from the command groups' modules."""
from __future__ import annotations

import argparse
import os
import sys

from cluster.cli.ckpt import add_ckpt_commands
from cluster.cli.cluster import add_cluster_commands
from cluster.cli.data import add_data_commands
from cluster.cli.demo import add_demo_commands
from cluster.cli.eval import add_eval_commands
from cluster.cli.generate import add_generate_commands
from cluster.cli.model import add_model_commands
from cluster.cli.observe import add_observe_commands
from cluster.cli.train import add_train_commands
from vlm.config import ConfigError

# Each adds its command group's subparsers (in this order, which `vlm --help` lists) and
# holds their cmd_* functions: (subparsers, add_config_args) -> None.
COMMAND_GROUPS = (add_demo_commands, add_data_commands, add_generate_commands, add_ckpt_commands,
                  add_cluster_commands, add_train_commands, add_eval_commands, add_model_commands,
                  add_observe_commands)


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
    for add_commands in COMMAND_GROUPS:
        add_commands(sub, _config_args)
    return parser


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
        from cluster.ray.session import use_loopback_only
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
