"""`vlm cluster ...`: training runs as Ray jobs on a (remote) Ray cluster.

submit packages the project and the resolved run config as a Ray job (Jobs API: a
runtime_env with a working_dir and environment variables). Its entrypoint is
`python -m cluster.cli.main cluster run`, which trains under Ray Train with a failure policy
(see cluster/ray/train.py). The submission id is derived from the run name, so a retried
submit of a name that is pending, running or succeeded attaches to that job instead of
starting a second one; a name whose job failed or stopped gets a new submission id and
its run resumes from the newest complete checkpoint in the same run directory.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
JOB_CONFIG = "vlm_job_config.yaml"  # the resolved run config, at the root of the job's working_dir
# What the job's working_dir holds: the project's packages and configs, nothing else
# (no virtual environment, no runs, no git history).
PACKAGE_ITEMS = ("vlm", "cluster", "data_pipeline", "configs", "pyproject.toml")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ACTIVE = {"PENDING", "RUNNING"}
DONE_OK = {"SUCCEEDED"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STOP_REPORT_S = 15  # beyond train.stop_grace_s: for the job's driver to report and exit before Ray's SIGKILL


def add_cluster_commands(sub, config_args) -> None:
    cl = sub.add_parser(
        "cluster", help="submit, watch and stop training jobs on a Ray cluster",
        description="Training runs as Ray jobs. The address is the Ray dashboard / job server "
        f"(default {DEFAULT_ADDRESS}, or $RAY_API_SERVER_ADDRESS). On a shared cluster enable Ray's "
        "token authentication and set RAY_AUTH_TOKEN (see docs/cluster.md).")
    cs = cl.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")

    def address(p):
        p.add_argument("--address", metavar="URL",
                       default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
                       help=f"the job server (default: $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})")

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
    address(p)
    config_args(p, required=True)
    p.add_argument("--name", metavar="NAME", help="run name (default: the config's name); letters, digits, "
                   "'.', '_', '-'")
    p.add_argument("--max-failures", type=int, default=3, metavar="N",
                   help="worker-group restarts after a worker or node dies (default 3; -1: unlimited)")
    p.add_argument("--stop-grace", type=float, metavar="SECONDS",
                   help="after `vlm cluster stop`, how long the trainer has to save a final checkpoint "
                   "before it is killed: sets train.stop_grace_s (default: the config's, 60)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the job and its workers (repeatable)")
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 0 only "
                   "when it succeeded")
    p.set_defaults(func=cmd_submit)

    for name, helptext, func in (("status", "one job's status, run directory and metrics", cmd_status),
                                 ("stop", "stop a job: the trainer saves a final checkpoint first", cmd_stop)):
        p = cs.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        address(p)
        p.add_argument("job", metavar="NAME_OR_ID", help="a run name or a submission id")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print one JSON object")
        else:
            p.add_argument("--no-wait", action="store_true", help="return without waiting for the job to end")
            p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                           help="how long to wait for the job to end (default 120)")
        p.set_defaults(func=func)

    p = cs.add_parser("logs", help="a job's logs", description="Prints a job's logs (driver and workers).")
    address(p)
    p.add_argument("job", metavar="NAME_OR_ID", help="a run name or a submission id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=cmd_logs)

    p = cs.add_parser("list", help="the training jobs on the cluster",
                      description="Every job submitted by `vlm cluster submit`, newest last.")
    address(p)
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


def submission_id(name: str, attempt: int = 1) -> str:
    return f"vlm-{name}" if attempt == 1 else f"vlm-{name}-{attempt}"


def _client(address: str):
    from cluster.ray.session import use_cluster_token_if_present

    use_cluster_token_if_present()  # before importing ray, which reads RAY_AUTH_MODE once
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise ConnectionError(f"the job server at {address} requires a token: set RAY_AUTH_TOKEN or put it in "
                              "~/.ray/auth_token (`ray get-auth-token` on the head prints it)") from e
    except (ConnectionError, RuntimeError) as e:
        raise ConnectionError(f"no Ray job server at {address} ({e}); start one with `ray start --head` "
                              "(deploy/local/) or pass --address") from e


def _vlm_jobs(client, name: str | None = None) -> list:
    """Jobs submitted by `vlm cluster submit` (of one run name), oldest first."""
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("vlm_run")
            and (name is None or j.metadata["vlm_run"] == name)]
    return sorted(jobs, key=lambda j: (j.start_time or 0, j.submission_id or ""))


def _find(client, job: str):
    """A run name (its newest job) or a submission id -> JobDetails."""
    named = _vlm_jobs(client, job)
    if named:
        return named[-1]
    for j in client.list_jobs():
        if job in (j.submission_id, j.job_id):
            return j
    raise ValueError(f"no job named {job!r} on the cluster (neither a run name nor a submission id); "
                     "`vlm cluster list` shows them")


def _status_line(j) -> str:
    meta = j.metadata or {}
    parts = [f"{j.submission_id}: {j.status}", f"run {meta.get('vlm_run', '-')}"]
    if meta.get("run_dir"):
        parts.append(f"run dir {meta['run_dir']}")
    if j.message and j.status not in ("RUNNING", "SUCCEEDED"):
        parts.append(j.message.strip().splitlines()[-1][:200])
    return "; ".join(parts)


def _stage(cfg, name: str) -> str:
    """A temporary working_dir: the project's packages and configs plus the resolved run
    config. Ray uploads it (zipped, content-addressed) to the cluster."""
    root = Path(__file__).resolve().parent.parent
    stage = Path(tempfile.mkdtemp(prefix=f"vlm-job-{name}-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in PACKAGE_ITEMS:
        src = root / item
        if src.is_dir():
            shutil.copytree(src, stage / item, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, stage / item)
    from vlm.config import dump_config

    (stage / JOB_CONFIG).write_text(dump_config(cfg))
    return str(stage)


def _absolute(path: str) -> str:
    """A relative local path -> absolute, against the submitter's working directory (the
    job runs in a copy of the project elsewhere); URLs and {run_dir} templates unchanged."""
    if "://" in path or path.startswith("{run_dir}") or Path(path).is_absolute():
        return path
    return str(Path(path).resolve())


def _make_paths_absolute(cfg) -> None:
    cfg.run_dir = _absolute(cfg.run_dir)
    cfg.data.train_shards = _absolute(cfg.data.train_shards)
    cfg.data.eval_shards = _absolute(cfg.data.eval_shards)
    cfg.train.checkpoint_dir = _absolute(cfg.train.checkpoint_dir)
    for source in cfg.data.reader.mix:
        source.shards = _absolute(source.shards)


def name_run(cfg, name: str | None) -> str:
    """--name N names the run (its submission ids, the metrics' `run` label) and, where N
    is not the config's name, gives it a directory of its own: N beside the config's
    run_dir (runs/demo -> runs/N), which its tokenizer, logs, metrics targets and
    checkpoints ({run_dir}/checkpoints) follow, so two names never share them. Inputs
    written with {run_dir} (the shards) keep pointing into the config's run_dir."""
    name = name or cfg.name
    if not NAME_RE.match(name):
        raise ValueError(f"run name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    if name == cfg.name:
        return name
    from vlm.config import ConfigError

    if not cfg.train.checkpoint_dir.startswith("{run_dir}"):
        raise ConfigError(f"--name {name}: train.checkpoint_dir {cfg.train.checkpoint_dir!r} does not follow "
                          "{run_dir}, so runs of every name would share it: set train.checkpoint_dir to "
                          "'{run_dir}/checkpoints' or to a directory of this run's own")
    cfg.data.train_shards = cfg.path(cfg.data.train_shards)
    cfg.data.eval_shards = cfg.path(cfg.data.eval_shards)
    for source in cfg.data.reader.mix:
        source.shards = cfg.path(source.shards)
    cfg.name, cfg.run_dir = name, str(Path(cfg.run_dir).parent / name)
    return name


def _previous_config(cfg, previous: list) -> tuple[dict | None, str]:
    """The config a run name was last submitted with (its newest job's metadata) or, when
    no job says, the one its run directory was started with (config.yaml); None if neither."""
    meta = (previous[-1].metadata or {}) if previous else {}
    if meta.get("vlm_config"):
        return json.loads(meta["vlm_config"]), f"job {previous[-1].submission_id}"
    saved = Path(cfg.run_dir) / "config.yaml"
    if saved.is_file():
        import yaml

        return yaml.safe_load(saved.read_text()), str(saved)
    return None, ""


def check_resubmission(cfg, name: str, previous: list) -> None:
    """ConfigError when a name is submitted again with another config than before: for a
    job pending, running or succeeded (nothing would be submitted) any difference; for
    one that failed or stopped (it resumes) the keys a resume cannot change, and its run
    and checkpoint directories."""
    from vlm.config import RESUME_CHANGEABLE, ConfigError, config_changes, format_changes

    saved, source = _previous_config(cfg, previous)
    if not saved:
        return
    if previous and previous[-1].status in ACTIVE | DONE_OK:
        changes = config_changes(saved, cfg, allowed=())
        if changes:
            raise ConfigError(f"run {name!r} is already submitted ({_status_line(previous[-1])}) with another "
                              f"config, which submitting it again would not change:\n{format_changes(changes)}\n"
                              "pick a new --name for a run with this config")
        return
    pinned = ("run_dir", "train.checkpoint_dir") if previous else ()
    changes = config_changes(saved, cfg, allowed=tuple(k for k in RESUME_CHANGEABLE if k not in pinned))
    if changes:
        raise ConfigError(f"run {name!r} was started with another config ({source}), which its resume cannot "
                          f"change:\n{format_changes(changes)}\nonly these may change when a run resumes: "
                          f"{', '.join(RESUME_CHANGEABLE)} (docs/checkpoints.md); pick a new --name to start "
                          "a run with this config")


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def resolve_submission(config: str, overrides: list[str], name: str | None):
    """-> (the run config a submission stages, its run name): loaded, named (--name), its
    local paths made absolute and pre-flighted, as far as that needs no file of the
    cluster's (the job's entrypoint checks the rest before it starts Ray)."""
    from cluster.preflight import check_train
    from vlm.config import load_config

    cfg = load_config(config, overrides)
    name = name_run(cfg, name)
    _make_paths_absolute(cfg)
    check_train(cfg, "auto", local=False)
    return cfg, name


def cmd_submit(args) -> int:
    if args.max_failures < -1:
        raise ValueError(f"--max-failures {args.max_failures}: use -1 (unlimited), 0 or more")
    cfg, name = resolve_submission(args.config, args.overrides, args.name)
    env = _env_pairs(args.env)
    if args.stop_grace is not None:
        if args.stop_grace <= 0:
            raise ValueError(f"--stop-grace {args.stop_grace:g}: use a positive number of seconds")
        cfg.train.stop_grace_s = args.stop_grace
    # the job's driver gives up on the workers after train.stop_grace_s; Ray kills it a little later
    env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(math.ceil(cfg.train.stop_grace_s) + STOP_REPORT_S))
    client = _client(args.address)

    previous = _vlm_jobs(client, name)
    check_resubmission(cfg, name, previous)
    if previous and previous[-1].status in ACTIVE | DONE_OK:
        job = previous[-1]
        print(f"run {name!r} is already submitted, not starting another: {_status_line(job)}")
        return _follow(client, job.submission_id) if args.wait else 0
    sid = submission_id(name, len(previous) + 1)
    stage = _stage(cfg, name)
    entrypoint = (f"python -m cluster.cli.main cluster run --config {JOB_CONFIG} --name {name} "
                  f"--max-failures {args.max_failures}")
    try:
        _submit_when_agent_ready(client, entrypoint=entrypoint, submission_id=sid,
                                 runtime_env={"working_dir": stage, "env_vars": env},
                                 metadata={"vlm_run": name, "run_dir": cfg.run_dir,
                                           "vlm_config": json.dumps(cfg.model_dump(mode="json"))})
    except RuntimeError as e:
        if "already exists" not in str(e):
            raise
        # a concurrent submit of the same name won the race: the submission id is the lock
        print(f"run {name!r} was just submitted by someone else: {_status_line(client.get_job_info(sid))}")
        return _follow(client, sid) if args.wait else 0
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    resumes = " (resumes from its newest checkpoint)" if previous else ""
    print(f"submitted {sid}: run {name!r}{resumes}")
    print(f"  run directory: {cfg.run_dir}")
    ports = f"port {cfg.metrics.port} + rank" if cfg.metrics.port else "a free port"
    print(f"  metrics: each worker serves Prometheus metrics on {ports}, written to "
          f"{Path(cfg.run_dir) / 'metrics'}/rank*.json and announced as file_sd targets in "
          f"{Path(cfg.run_dir) / 'metrics' / 'targets'}/ (`vlm monitor {cfg.run_dir}` scrapes them)")
    print(f"  watch: vlm cluster status {name} / vlm cluster logs {name} --follow; stop: vlm cluster stop {name}")
    return _follow(client, sid) if args.wait else 0


def _submit_when_agent_ready(client, *, timeout: float = 90.0, **job) -> None:
    """client.submit_job, retried while the head's job agent is not up yet (a cluster
    started moments ago answers 'No available agent to submit job'); bounded."""
    deadline = time.monotonic() + timeout
    delay = 1.0
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() + delay > deadline:
                raise
            print(f"the cluster's job agent is not ready yet; retrying in {delay:.0f}s", file=sys.stderr)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _follow(client, sid: str) -> int:
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(sid):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = _wait_terminal(client, sid, timeout=60.0)
    print(f"job {sid} ended: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _wait_terminal(client, sid: str, *, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(sid))  # JobStatus is a str enum: "SUCCEEDED", ...
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def cmd_status(args) -> int:
    client = _client(args.address)
    j = _find(client, args.job)
    if args.json:
        print(json.dumps({"submission_id": j.submission_id, "status": str(j.status),
                          "run": (j.metadata or {}).get("vlm_run"), "run_dir": (j.metadata or {}).get("run_dir"),
                          "message": j.message, "start_time": j.start_time, "end_time": j.end_time,
                          "entrypoint": j.entrypoint}, indent=2))
        return 0
    print(_status_line(j))
    run_dir = (j.metadata or {}).get("run_dir")
    if run_dir and Path(run_dir, "checkpoints", "latest").is_file():
        print(f"  newest checkpoint: {Path(run_dir, 'checkpoints', 'latest').read_text().strip()}")
    return 0


def cmd_logs(args) -> int:
    client = _client(args.address)
    j = _find(client, args.job)
    if args.follow:
        return _follow(client, j.submission_id)
    print(client.get_job_logs(j.submission_id), end="")
    return 0


def cmd_stop(args) -> int:
    client = _client(args.address)
    j = _find(client, args.job)
    if str(j.status) in TERMINAL:
        print(f"{j.submission_id} has already ended: {j.status}")
        return 0
    client.stop_job(j.submission_id)
    print(f"asked {j.submission_id} to stop: its workers save a checkpoint and end")
    if args.no_wait:
        return 0
    status = _wait_terminal(client, j.submission_id, timeout=args.timeout)
    print(f"{j.submission_id}: {status}")
    return 0 if status in TERMINAL else 1


def cmd_list(args) -> int:
    client = _client(args.address)
    jobs = (sorted(client.list_jobs(), key=lambda j: (j.start_time or 0)) if args.all else _vlm_jobs(client))
    rows = [{"submission_id": j.submission_id, "status": str(j.status),
             "run": (j.metadata or {}).get("vlm_run", ""), "run_dir": (j.metadata or {}).get("run_dir", ""),
             "start_time": j.start_time} for j in jobs]
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
    from cluster.ray.session import worker_env
    from vlm.config import load_config

    cfg = load_config(args.config, args.overrides)
    name = name_run(cfg, args.name)
    check_train(cfg, "auto")  # before Ray: the batch, the checkpoint's config, a writable run_dir
    import ray

    # The job's runtime_env (working_dir, --env) is inherited; add only what it lacks
    # (Ray refuses a driver runtime_env whose variables clash with the job's).
    extra = {k: v for k, v in worker_env().items() if k not in os.environ}
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), runtime_env={"env_vars": extra} if extra else None)
    prepare_tokenizer(cfg)
    print(f"run {name}: {cfg.train.num_workers} worker(s), run directory {cfg.run_dir}, "
          f"up to {args.max_failures} restart(s) of the worker group", flush=True)
    # SIGTERM (`vlm cluster stop`) or SIGINT: the workers save and end within train.stop_grace_s
    status = run_supervised(cfg, name=name, resume="auto", max_failures=args.max_failures)
    latest = Path(cfg.path(cfg.train.checkpoint_dir)) / "latest"
    where = f"; newest checkpoint {latest.read_text().strip()}" if latest.is_file() else ""
    print(f"run {name} {'stopped' if status else 'finished'}{where}", flush=True)
    return status
