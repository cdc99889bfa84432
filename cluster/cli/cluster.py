"""`vlm cluster ...`: the arguments of the Ray-job commands; the jobs themselves are cluster/ray/jobs.py's.

submit packages the project and the resolved run config as a Ray job whose entrypoint is
`vlm cluster run` (see cluster/ray/jobs.py for how run names map to submission ids and resumes).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cluster.ray.jobs import (connect, find_job, follow, job_record, list_jobs, name_run, newest_checkpoint,
                              resolve_submission, status_line, stop_job, submit_run, warn_shared_temp_dirs)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _address(p) -> None:
    p.add_argument("--address", metavar="URL",
                   default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
                   help=f"the job server (default: $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})")


def add_cluster_commands(sub, config_args) -> None:
    cl = sub.add_parser(
        "cluster", help="submit, watch and stop training jobs on a Ray cluster",
        description="Training runs as Ray jobs. The address is the Ray dashboard / job server "
        f"(default {DEFAULT_ADDRESS}, or $RAY_API_SERVER_ADDRESS). On a shared cluster enable Ray's "
        "token authentication and set RAY_AUTH_TOKEN (see docs/cluster.md).")
    cs = cl.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    _add_submit(cs, config_args)

    for name, helptext, func in (("status", "one job's status, run directory and metrics", cmd_status),
                                 ("stop", "stop a job: the trainer saves a final checkpoint first", cmd_stop)):
        p = cs.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        _address(p)
        p.add_argument("job", metavar="NAME_OR_ID", help="a run name or a submission id")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print one JSON object")
        else:
            p.add_argument("--no-wait", action="store_true", help="return without waiting for the job to end")
            p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                           help="how long to wait for the job to end (default 120)")
        p.set_defaults(func=func)

    p = cs.add_parser("logs", help="a job's logs", description="Prints a job's logs (driver and workers).")
    _address(p)
    p.add_argument("job", metavar="NAME_OR_ID", help="a run name or a submission id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=cmd_logs)

    p = cs.add_parser("list", help="the training jobs on the cluster",
                      description="Every job submitted by `vlm cluster submit`, newest last.")
    _address(p)
    p.add_argument("--all", action="store_true", help="also jobs not submitted by vlm")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_list)

    p = cs.add_parser("run", help="the job's entrypoint: train under Ray Train with restarts",
                      description="Runs inside a Ray job (RAY_ADDRESS set by Ray): trains on Ray Train "
                      "workers; when a worker or node dies the group restarts and resumes from the newest "
                      "complete checkpoint, up to --max-failures times; SIGTERM (`vlm cluster stop`) makes "
                      "every worker save a checkpoint and stop. Resumes an existing run directory.")
    config_args(p, required=True)
    p.add_argument("--name", metavar="NAME", help="run name (default: the config's name)")
    p.add_argument("--max-failures", type=int, default=3, metavar="N",
                   help="worker-group restarts (default 3; -1: unlimited)")
    p.set_defaults(func=cmd_run)


def _add_submit(cs, config_args) -> None:
    p = cs.add_parser("submit", help="package the project and a run config as a Ray job",
                      description="Submits a training run. The run name (--name, default the config's "
                      "`name`) decides the submission id, the metrics' `run` label and the run directory "
                      "(a name other than the config's trains in NAME beside the config's run_dir, "
                      "e.g. runs/NAME; its checkpoints follow). Submitting a name with another config "
                      "than its earlier job's is refused, listing the keys. Submitting a name that is "
                      "pending, running or succeeded prints that job instead of starting another; a name "
                      "whose job failed or was stopped is submitted again and resumes from its newest "
                      "complete checkpoint. Relative paths (run_dir, shards, checkpoint_dir) are made absolute "
                      "here: the cluster must see them (one machine, or a shared file system); on a "
                      "multi-node cluster put run_dir on a shared file system or use s3:// shards and "
                      "checkpoint_dir.")
    _address(p)
    config_args(p, required=True)
    p.add_argument("--name", metavar="NAME", help="run name (default: the config's name); letters, digits, "
                   "'.', '_', '-'")
    p.add_argument("--max-failures", type=int, default=3, metavar="N",
                   help="worker-group restarts after a worker or node dies (default 3; -1: unlimited)")
    p.add_argument("--stop-grace", type=float, metavar="SECONDS",
                   help="after `vlm cluster stop`, how long the trainer has to save a final checkpoint "
                   "before it is killed: sets train.stop_grace_s (default: the config's, 60)")
    p.add_argument("--python", metavar="PATH", help="absolute path of the interpreter the job runs on the "
                   "cluster's nodes (default: this one, %(default)s; right where the nodes share this "
                   "machine's environment)", default=sys.executable)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the job and its workers (repeatable)")
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 0 only "
                   "when it succeeded")
    p.set_defaults(func=cmd_submit)


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def cmd_submit(args) -> int:
    if args.max_failures < -1:
        raise ValueError(f"--max-failures {args.max_failures}: use -1 (unlimited), 0 or more")
    if not os.path.isabs(args.python):
        raise ValueError(f"--python {args.python}: give the interpreter's absolute path on the cluster's nodes "
                         "(the job runs in a copy of the project, with the node's PATH)")
    cfg, name = resolve_submission(args.config, args.overrides, args.name)
    env = _env_pairs(args.env)
    if args.stop_grace is not None:
        if args.stop_grace <= 0:
            raise ValueError(f"--stop-grace {args.stop_grace:g}: use a positive number of seconds")
        cfg.train.stop_grace_s = args.stop_grace
    return submit_run(args.address, cfg, name, env=env, max_failures=args.max_failures, wait=args.wait,
                      python=args.python)


def cmd_status(args) -> int:
    j = find_job(connect(args.address), args.job)
    if args.json:
        print(json.dumps(job_record(j), indent=2))
        return 0
    print(status_line(j))
    tag = newest_checkpoint(j)
    if tag is not None:
        print(f"  newest checkpoint: {tag}")
    return 0


def cmd_logs(args) -> int:
    client = connect(args.address)
    j = find_job(client, args.job)
    if args.follow:
        return follow(client, j.submission_id)
    print(client.get_job_logs(j.submission_id), end="")
    return 0


def cmd_stop(args) -> int:
    client = connect(args.address)
    return stop_job(client, find_job(client, args.job), wait=not args.no_wait, timeout=args.timeout)


def cmd_list(args) -> int:
    rows = list_jobs(connect(args.address), every=args.all)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no jobs")
        return 0
    width = max(len(str(r["submission_id"])) for r in rows)
    for r in rows:
        print(f"{str(r['submission_id']):<{width}}  {r['status']:<9}  {r['run']:<20}  {r['run_dir']}")
    return 0


def cmd_run(args) -> int:
    """The job's entrypoint (a Ray job driver)."""
    from vlm.data.tokenizer import prepare_tokenizer
    from cluster.ray.train import run_supervised
    from cluster.preflight import check_train
    from cluster.ray.session import join_for_job
    from vlm.checkpoint.discover import read_latest
    from vlm.config import load_config

    cfg = load_config(args.config, args.overrides)
    name = name_run(cfg, args.name)
    check_train(cfg, "auto")  # before Ray: the batch, the checkpoint's config, a writable run_dir
    join_for_job()
    import ray

    warn_shared_temp_dirs(ray.nodes())
    prepare_tokenizer(cfg)
    low, high = cfg.train.worker_range()
    print(f"run {name}: {low if low == high else f'{low} to {high}'} worker(s), run directory {cfg.run_dir}, "
          f"up to {args.max_failures} restart(s) of the worker group", flush=True)
    # SIGTERM (`vlm cluster stop`) or SIGINT: the workers save and end within train.stop_grace_s
    status = run_supervised(cfg, name=name, resume="auto", max_failures=args.max_failures)
    latest = read_latest(Path(cfg.path(cfg.train.checkpoint_dir)))
    where = f"; newest checkpoint {latest}" if latest is not None else ""
    print(f"run {name} {'stopped' if status else 'finished'}{where}", flush=True)
    return status
