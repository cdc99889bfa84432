"""Starting or joining Ray for the CLI commands."""
from __future__ import annotations

import contextlib
import os

from cluster.ray.loopback import loopback_env, use_loopback_only


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None):
    """Joins `address` (or RAY_ADDRESS), or starts a private local instance on 127.0.0.1
    that is shut down afterwards. An already-initialised Ray is used as it is."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        use_loopback_only()
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        use_cluster_token_if_present()
        ray.init(address=address, runtime_env={"env_vars": worker_env()})
    else:
        # The dashboard (on 127.0.0.1) also serves the state API that Ray Train's
        # controller polls; without it the controller logs a failure every second.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                 dashboard_host="127.0.0.1", runtime_env={"env_vars": worker_env()})
    try:
        yield
    finally:
        ray.shutdown()


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
