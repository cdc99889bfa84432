"""Module-level task functions for LocalRunner tests (a pool pickles its task by name):
each misbehaves on its first attempt, recorded by creating ``marker``."""
from __future__ import annotations

import os
from pathlib import Path


def _first_attempt(marker: str) -> bool:
    try:
        Path(marker).touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


def dies_once(marker: str, value: int) -> dict:
    """The worker process dies (as under the OOM killer) on the first attempt."""
    if _first_attempt(marker):
        os._exit(9)
    return {"value": value, "pid": os.getpid()}


def connection_error_once(marker: str, value: int) -> dict:
    if _first_attempt(marker):
        raise ConnectionError("the bucket went away for a moment")
    return {"value": value}


def value_error_once(marker: str, value: int) -> dict:
    if _first_attempt(marker):
        raise ValueError("bad input: would fail again")
    return {"value": value}


def registry_claim(registry, shard_id: int, digest: bytes, key: str) -> dict:
    """Claims one hash in the run's registry from the worker, as a shard task does."""
    return {"owner": registry.claim(shard_id, [(digest, key)])[0]}
