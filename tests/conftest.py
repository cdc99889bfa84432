"""Test-wide rules: everything stays on loopback.

The loopback switches must be set before anything imports ray. The guard makes any
connection from the test process to an address outside 127.0.0.0/8 (or ::1) fail before
a packet is sent, so a test that would reach the outside world fails instead."""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest

from cluster.ray.session import use_loopback_only

use_loopback_only()
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on the CPU through its interpreter; the switch is read when a kernel
# module is imported, so it is set before any test imports one.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check(address) -> None:
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        host = address[0]
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            if host != "localhost":
                raise ConnectionRefusedError(f"test guard: connection to non-loopback host {host!r} blocked")
            return
        if not ip.is_loopback:
            raise ConnectionRefusedError(f"test guard: connection to non-loopback address {host} blocked")


def _guarded_connect(self, address):
    _check(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _check(address)
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


@pytest.fixture(autouse=True)
def _ray_auth_mode_stays_per_test():
    """A CLI command called in-process with a cluster address sets RAY_AUTH_MODE=token when
    the machine has a Ray token (~/.ray/auth_token, which `ray start` leaves behind). Left
    set, it reaches the Ray processes a later test starts in-process, while that test's
    already-imported Ray client still reads 'disabled': their GCS then refuses the client
    (InvalidAuthToken). Each test gets the variable back as it found it."""
    before = os.environ.get("RAY_AUTH_MODE")
    yield
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before
