"""`vlm monitor` and `vlm report`: a local Prometheus server over one run, and a run's charts."""
from __future__ import annotations


def add_observe_commands(sub, config_args) -> None:
    p = sub.add_parser("monitor", help="a local Prometheus server scraping one run's workers",
                       description="Writes RUN_DIR/monitor/prometheus.yml (file_sd over the targets the "
                       "run's workers announce in RUN_DIR/metrics/targets/, the alert rules of "
                       "deploy/prometheus/alerts.yml), starts the `prometheus` binary on 127.0.0.1 with "
                       "its database in RUN_DIR/monitor/data, prints its URL and serves until Ctrl-C. RUN_DIR may "
                       "be a URL (s3://bucket/run, credentials and endpoint from the AWS variables): the "
                       "config and database are then kept on this machine (--data-dir, default the run's "
                       "scratch directory under the temp dir), and the run's target files are copied "
                       "from the bucket into its targets/ subdirectory at every scrape interval.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (cfg.run_dir): a path or a URL")
    p.add_argument("--port", type=int, default=9090, metavar="N", help="listen port (default 9090; 0: any free)")
    p.add_argument("--scrape-interval", default="2s", metavar="DURATION", help="scrape interval (default 2s)")
    p.add_argument("--for", dest="duration", type=float, metavar="SECONDS",
                   help="stop after this many seconds instead of waiting for Ctrl-C")
    p.add_argument("--data-dir", metavar="DIR", help="where the config, log and database go (default: "
                   "RUN_DIR/monitor; for a URL, vlm-cache/HASH/monitor under the temp dir, HASH from the URL)")
    p.add_argument("--enable-lifecycle", action="store_true",
                   help="serve Prometheus' /-/reload and /-/quit (off by default: anyone who can reach "
                   "the port could reload or stop the server, without authentication)")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("report", help="PNG and HTML charts of a run",
                       description="Reads RUN_DIR/train_log.jsonl and, when present, RUN_DIR/eval_log.jsonl; "
                       "writes report.png (loss per objective, throughput, data-wait share, evaluation "
                       "figures over steps) and a self-contained report.html. RUN_DIR may be a URL "
                       "(s3://bucket/run, credentials and endpoint from the AWS variables): the report "
                       "is then written on this machine.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (cfg.run_dir): a path or a URL")
    p.add_argument("--output", metavar="DIR", help="where to write them (default: RUN_DIR; for a URL, "
                   "./NAME-report with NAME the URL's last component)")
    p.set_defaults(func=cmd_report)


def cmd_monitor(args) -> int:
    """Runs the monitor in the foreground; its exit status."""
    from vlm.observe.monitor import run_monitor

    return run_monitor(args.run_dir, port=args.port, scrape_interval=args.scrape_interval, duration=args.duration,
                       enable_lifecycle=args.enable_lifecycle, data_dir=args.data_dir)


def cmd_report(args) -> int:
    """Writes the run's report; 0."""
    from vlm.observe.report import write_report

    png, page = write_report(args.run_dir, args.output)
    print(f"report: {page}\ncharts: {png}")
    return 0
