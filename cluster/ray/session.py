"""Starting or joining Ray: the one place that calls ray.init (CLI commands, job drivers, tests).

Ray swaps 127.0.0.1 for the machine's outward address (so that other nodes could join),
and gloo picks its network interface from the hostname. For a local instance neither is
wanted: every port and every connection should stay on 127.0.0.1. Ray reads its switch
when it is imported, so `use_loopback_only()` must run before `import ray`."""
from __future__ import annotations

import contextlib
import os

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}


def use_loopback_only() -> None:
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)


def loopback_env() -> dict[str, str]:
    """The loopback settings in force here, for a runtime_env's env_vars."""
    return {k: os.environ[k] for k in LOOPBACK_ENV if k in os.environ}


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, lean: bool = False):
    """Joins `address` (or RAY_ADDRESS), or starts a private local instance on 127.0.0.1
    that is shut down afterwards. An already-initialised Ray is used as it is. Yields the
    `ray` module.

    `lean`: the local instance has no dashboard and no runtime_env (ingestion, curation and
    tests that need no Ray Train): it starts faster and its first tasks need no new workers."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        use_loopback_only()
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address:
        use_cluster_token_if_present()
        ray.init(address=address, runtime_env={"env_vars": worker_env()})
    elif lean:
        # No runtime_env: the workers inherit the loopback settings from this process's
        # environment (the raylet is our child), and a runtime_env would keep Ray from using
        # the workers it starts with the node (the first tasks waited ~1 s for new ones).
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False)
    else:
        # The dashboard (on 127.0.0.1) also serves the state API that Ray Train's
        # controller polls; without it the controller logs a failure every second.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                 dashboard_host="127.0.0.1", runtime_env={"env_vars": worker_env()})
    try:
        yield ray
    finally:
        ray.shutdown()


def join_for_job() -> None:
    """Joins the cluster a Ray job driver runs on (RAY_ADDRESS, else "auto"); it stays
    joined for the process's life. The job's runtime_env (working_dir, --env) is inherited;
    only the worker settings it lacks are added (Ray refuses a driver runtime_env whose
    variables clash with the job's)."""
    import ray

    extra = {k: v for k, v in worker_env().items() if k not in os.environ}
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), runtime_env={"env_vars": extra} if extra else None)


def use_cluster_token_if_present() -> None:
    """Ray 2.60 clusters started by `ray start` require a token by default, but a driver
    joining one by explicit address only sends it when RAY_AUTH_MODE=token (address="auto"
    guesses). Without this, joining fails with 'Authentication token is missing'. Ray reads
    the mode when imported, so the CLI calls this first."""
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file)):
        os.environ["RAY_AUTH_MODE"] = "token"


def worker_env() -> dict[str, str]:
    """Environment every Ray worker needs before it imports torch or DeepSpeed."""
    # DS_ACCELERATOR is not among them: each training worker sets it from its own node's
    # devices (cluster/ray/train.py), which may differ from the driver's.
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false",
           # Ray Train's print patch re-emits each worker print through logging: lines doubled.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env.update(loopback_env())
    return env
