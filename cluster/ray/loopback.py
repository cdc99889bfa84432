"""Keeping a private single-machine Ray on loopback.

Ray swaps 127.0.0.1 for the machine's outward address (so that other nodes could join),
and gloo picks its network interface from the hostname. For a local instance neither is
wanted: every port and every connection should stay on 127.0.0.1. Ray reads its switch
when it is imported, so `use_loopback_only()` must run before `import ray`."""
from __future__ import annotations

import os

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}


def use_loopback_only() -> None:
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)


def loopback_env() -> dict[str, str]:
    """The loopback settings in force here, for a runtime_env's env_vars."""
    return {k: os.environ[k] for k in LOOPBACK_ENV if k in os.environ}
