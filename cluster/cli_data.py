"""`vlm data ...`: ingest (and the stages after it) over webdataset shard directories."""
from __future__ import annotations

import contextlib

from vlm.config import load_config


def add_data_commands(sub, config_args) -> None:
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
    p.add_argument("--metrics-port", type=int, default=9300, metavar="N",
                   help="serve vlm_ingest_* Prometheus metrics on 127.0.0.1:N while ingesting "
                   "(default 9300; 0: any free port; -1: off); announced in $VLM_METRICS_SD_DIR when set")
    config_args(p)
    p.set_defaults(func=cmd_ingest)



def cmd_ingest(args) -> int:
    from cluster.ray_local import ray_session
    from data_pipeline.ingest import ingest

    cfg = load_config(args.config, args.overrides)
    with contextlib.ExitStack() as stack:
        metrics = None
        if args.metrics_port >= 0:
            from data_pipeline.metrics import IngestMetrics

            metrics = stack.enter_context(IngestMetrics(run=cfg.name, port=args.metrics_port))
            metrics.write_target()
            print(f"ingest metrics at {metrics.url}", flush=True)
        stack.enter_context(ray_session(args.ray_address))
        summary = ingest(args.input, args.output, cfg.data.ingest, progress=not args.no_progress, metrics=metrics)
    print(summary.format())
    return 0


