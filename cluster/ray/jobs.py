"""Training runs as Ray jobs: naming, packaging, submitting, finding, following and stopping them.

A submission packages the project and the resolved run config as a Ray job (Jobs API: a
runtime_env with a working_dir and environment variables). Its entrypoint is
`PYTHON -m cluster.cli.main cluster run`, which trains under Ray Train with a failure policy
(see cluster/ray/train.py). PYTHON is the interpreter of the environment that submits (or
`--python`), never a bare `python` from the node's PATH: a node started as `.venv/bin/ray
start` runs its workers in the venv but has the system Python first on PATH. The
submission id is derived from the run name, so a retried submit of a name that is pending, running or succeeded attaches to that job instead of
starting a second one; a name whose job failed or stopped gets a new submission id and
its run resumes from the newest complete checkpoint in the same run directory.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

JOB_CONFIG = "vlm_job_config.yaml"  # the resolved run config, at the root of the job's working_dir
# What the job's working_dir holds: the project's packages and configs, nothing else
# (no virtual environment, no runs, no git history).
PACKAGE_ITEMS = ("vlm", "cluster", "data_pipeline", "configs", "pyproject.toml")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ACTIVE = {"PENDING", "RUNNING"}
DONE_OK = {"SUCCEEDED"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STOP_REPORT_S = 15  # beyond train.stop_grace_s: for the job's driver to report and exit before Ray's SIGKILL


def submission_id(name: str, attempt: int = 1) -> str:
    return f"vlm-{name}" if attempt == 1 else f"vlm-{name}-{attempt}"


def connect(address: str):
    """A JobSubmissionClient for the job server at `address`; ConnectionError naming it when
    there is none or it wants a token."""
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


def vlm_jobs(client, name: str | None = None) -> list:
    """Jobs submitted by `vlm cluster submit` (of one run name), oldest first."""
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("vlm_run")
            and (name is None or j.metadata["vlm_run"] == name)]
    return sorted(jobs, key=lambda j: (j.start_time or 0, j.submission_id or ""))


def find_job(client, job: str):
    """A run name (its newest job) or a submission id -> JobDetails."""
    named = vlm_jobs(client, job)
    if named:
        return named[-1]
    for j in client.list_jobs():
        if job in (j.submission_id, j.job_id):
            return j
    raise ValueError(f"no job named {job!r} on the cluster (neither a run name nor a submission id); "
                     "`vlm cluster list` shows them")


def status_line(j) -> str:
    meta = j.metadata or {}
    parts = [f"{j.submission_id}: {j.status}", f"run {meta.get('vlm_run', '-')}"]
    if meta.get("run_dir"):
        parts.append(f"run dir {meta['run_dir']}")
    if j.message and j.status not in ("RUNNING", "SUCCEEDED"):
        parts.append(j.message.strip().splitlines()[-1][:200])
    return "; ".join(parts)


def stage(cfg, name: str) -> str:
    """A temporary working_dir: the project's packages and configs plus the resolved run
    config. Ray uploads it (zipped, content-addressed) to the cluster."""
    root = Path(__file__).resolve().parents[2]
    staged = Path(tempfile.mkdtemp(prefix=f"vlm-job-{name}-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in PACKAGE_ITEMS:
        src = root / item
        if src.is_dir():
            shutil.copytree(src, staged / item, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, staged / item)
    from vlm.config import dump_config

    (staged / JOB_CONFIG).write_text(dump_config(cfg))
    return str(staged)


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
    from vlm import rundir

    parent = cfg.run_dir.rstrip("/").rsplit("/", 1)[0] if rundir.is_remote(cfg.run_dir) else Path(cfg.run_dir).parent
    cfg.name, cfg.run_dir = name, rundir.join(parent, name)
    return name


def _previous_config(cfg, previous: list) -> tuple[dict | None, str]:
    """The config a run name was last submitted with (its newest job's metadata) or, when
    no job says, the one its run directory was started with (config.yaml); None if neither."""
    meta = (previous[-1].metadata or {}) if previous else {}
    if meta.get("vlm_config"):
        return json.loads(meta["vlm_config"]), f"job {previous[-1].submission_id}"
    import yaml

    saved = _read_run_file(cfg.run_dir, "config.yaml")
    return (yaml.safe_load(saved), rundir_join(cfg.run_dir, "config.yaml")) if saved is not None else (None, "")


def rundir_join(run_dir: str, *names: str) -> str:
    from vlm import rundir

    return rundir.join(run_dir, *names)


def _read_run_file(run_dir: str, *names: str) -> str | None:
    """A file of a run directory (a path or a URL) as text; None when it is not there or,
    for a run directory on an object store, cannot be read from here (said on stderr)."""
    from vlm import rundir

    path = rundir.join(run_dir, *names)
    try:
        return rundir.read_text(path) if rundir.exists(path) else None
    except Exception as e:  # an object store without credentials here: botocore's errors are no OSError
        if not rundir.is_remote(path):
            raise
        print(f"vlm: warning: cannot read {path} from here ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def check_resubmission(cfg, name: str, previous: list) -> None:
    """ConfigError when a name is submitted again with another config than before: for a
    job pending, running or succeeded (nothing would be submitted) any difference; for
    one that failed or stopped (it resumes) the keys a resume cannot change, and its run
    and checkpoint directories."""
    from vlm.config import ConfigError
    from vlm.config_changes import RESUME_CHANGEABLE, config_changes, format_changes

    saved, source = _previous_config(cfg, previous)
    if not saved:
        return
    if previous and previous[-1].status in ACTIVE | DONE_OK:
        changes = config_changes(saved, cfg, allowed=())
        if changes:
            raise ConfigError(f"run {name!r} is already submitted ({status_line(previous[-1])}) with another "
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


def entrypoint(python: str, name: str, max_failures: int) -> str:
    """The job's shell command: `python` runs `vlm cluster run`; where that interpreter is not
    on the node the job fails with a message naming it instead of the shell's bare 'not found'."""
    py = shlex.quote(python)
    missing = shlex.quote(f"vlm: error: the job interpreter {python} is not an executable on this cluster "
                          "node: submit from an environment installed at the same path on the nodes, or "
                          "name their interpreter: vlm cluster submit --python PATH")
    return (f"if [ ! -x {py} ]; then echo {missing} >&2; exit 127; fi; exec {py} -m cluster.cli.main cluster run "
            f"--config {JOB_CONFIG} --name {shlex.quote(name)} --max-failures {max_failures}")


def submit_run(address: str, cfg, name: str, *, env: dict[str, str], max_failures: int, wait: bool,
               python: str | None = None) -> int:
    """Submits run `name` (cfg resolved by resolve_submission) as a Ray job, or attaches to
    its job when one is pending, running or succeeded; prints where to watch it. The job
    runs `python` (default: this process's interpreter). With `wait`, follows its logs: 0
    only when it succeeded."""
    # the job's driver gives up on the workers after train.stop_grace_s; Ray kills it a little later
    env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(math.ceil(cfg.train.stop_grace_s) + STOP_REPORT_S))
    client = connect(address)

    previous = vlm_jobs(client, name)
    check_resubmission(cfg, name, previous)
    if previous and previous[-1].status in ACTIVE | DONE_OK:
        job = previous[-1]
        print(f"run {name!r} is already submitted, not starting another: {status_line(job)}")
        return follow(client, job.submission_id) if wait else 0
    sid = submission_id(name, len(previous) + 1)
    staged = stage(cfg, name)
    try:
        submit_when_agent_ready(client, entrypoint=entrypoint(python or sys.executable, name, max_failures),
                                submission_id=sid,
                                runtime_env={"working_dir": staged, "env_vars": env},
                                metadata={"vlm_run": name, "run_dir": cfg.run_dir,
                                          "vlm_config": json.dumps(cfg.model_dump(mode="json"))})
    except RuntimeError as e:
        if "already exists" not in str(e):
            raise
        # a concurrent submit of the same name won the race: the submission id is the lock
        print(f"run {name!r} was just submitted by someone else: {status_line(client.get_job_info(sid))}")
        return follow(client, sid) if wait else 0
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    _print_submitted(cfg, name, sid, resumes=bool(previous))
    return follow(client, sid) if wait else 0


def _print_submitted(cfg, name: str, sid: str, *, resumes: bool) -> None:
    print(f"submitted {sid}: run {name!r}{' (resumes from its newest checkpoint)' if resumes else ''}")
    print(f"  run directory: {cfg.run_dir}")
    ports = f"port {cfg.metrics.port} + rank" if cfg.metrics.port else "a free port"
    print(f"  metrics: each worker serves Prometheus metrics on {ports}, written to "
          f"{rundir_join(cfg.run_dir, 'metrics')}/rank*.json and announced as file_sd targets in "
          f"{rundir_join(cfg.run_dir, 'metrics', 'targets')}/ (`vlm monitor {cfg.run_dir}` scrapes them)")
    print(f"  watch: vlm cluster status {name} / vlm cluster logs {name} --follow; stop: vlm cluster stop {name}")


def submit_when_agent_ready(client, *, timeout: float = 90.0, **job) -> None:
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


def follow(client, sid: str) -> int:
    """Prints a job's logs until it ends: 0 when it succeeded, else 1."""
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(sid):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = wait_terminal(client, sid, timeout=60.0)
    print(f"job {sid} ended: {status}")
    return 0 if status == "SUCCEEDED" else 1


def wait_terminal(client, sid: str, *, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(sid))  # JobStatus is a str enum: "SUCCEEDED", ...
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def warn_shared_temp_dirs(nodes: list[dict]) -> None:
    """Warns (stderr, the job's log) about live nodes of one machine in one Ray temp dir, as
    a node started without `ray start --temp-dir` next to the head is: each node's log monitor
    forwards every worker line of that dir (each printed once per node), and each node's
    runtime-env agent deletes job working dirs there that it no longer uses, the driver's too."""
    shared: dict[tuple[str, str], list[str]] = {}
    for n in nodes:  # one machine: one host name (its nodes may have several loopback addresses)
        if n.get("Alive") and n.get("ObjectStoreSocketName"):
            session_dir = str(Path(n["ObjectStoreSocketName"]).parent.parent)
            host = n.get("NodeManagerHostname") or n["NodeManagerAddress"]
            shared.setdefault((host, session_dir), []).append(n["NodeID"])
    for (host, session_dir), ids in shared.items():
        if len(ids) > 1:
            print(f"vlm: warning: {len(ids)} Ray nodes on {host} share one temp dir ({session_dir}): every "
                  f"worker line is logged {len(ids)} times and a node can delete the job's working dir "
                  "under its driver; start each node with a `ray start --temp-dir` of its own "
                  "(deploy/local/README.md)", file=sys.stderr, flush=True)


def stop_job(client, j, *, wait: bool, timeout: float) -> int:
    """Asks job `j` to stop (its workers save a checkpoint first); with `wait`, waits up to
    `timeout` seconds for it to end: 0 when it ended (or had already), else 1."""
    if str(j.status) in TERMINAL:
        print(f"{j.submission_id} has already ended: {j.status}")
        return 0
    client.stop_job(j.submission_id)
    print(f"asked {j.submission_id} to stop: its workers save a checkpoint and end")
    if not wait:
        return 0
    status = wait_terminal(client, j.submission_id, timeout=timeout)
    print(f"{j.submission_id}: {status}")
    return 0 if status in TERMINAL else 1


def job_record(j) -> dict:
    """One job, as `vlm cluster status --json` prints it."""
    meta = j.metadata or {}
    return {"submission_id": j.submission_id, "status": str(j.status), "run": meta.get("vlm_run"),
            "run_dir": meta.get("run_dir"), "message": j.message, "start_time": j.start_time,
            "end_time": j.end_time, "entrypoint": j.entrypoint}


def list_jobs(client, *, every: bool = False) -> list[dict]:
    """The vlm jobs (every job with `every`), oldest first, as `vlm cluster list` prints them."""
    jobs = sorted(client.list_jobs(), key=lambda j: (j.start_time or 0)) if every else vlm_jobs(client)
    return [{"submission_id": j.submission_id, "status": str(j.status),
             "run": (j.metadata or {}).get("vlm_run", ""), "run_dir": (j.metadata or {}).get("run_dir", ""),
             "start_time": j.start_time} for j in jobs]


def newest_checkpoint(j) -> str | None:
    """The tag in the job's run_dir/checkpoints/latest, when the run directory is visible here."""
    run_dir = (j.metadata or {}).get("run_dir")
    latest = _read_run_file(run_dir, "checkpoints", "latest") if run_dir else None
    return latest.strip() if latest is not None else None
