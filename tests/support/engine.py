"""`python -m vlm.train.trainer` as one process: its own 1-rank gloo group on loopback, no Ray."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def engine(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs one rank of the engine on `config` (extra trainer arguments after it)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "vlm.train.trainer", "--config", str(config), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
