"""A real `ray start --head` on 127.0.0.1 for the end-to-end tests, and stopping only it.

Every port is its own (another Ray on this machine, such as a running demo, holds the
default ones, and the job server needs its own agent), and so is the temp dir (short: Ray
puts unix sockets under it). `ray stop --force` would kill every Ray of the user on the
machine; `stop_head` kills this head's processes and their descendants only."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from support.ports import free_port

BIN = Path(sys.executable).parent
AGENT_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
               "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port")


@dataclass
class Head:
    address: str        # GCS, for `--ray-address` / ray.init
    dashboard_url: str  # the job server, for `vlm cluster --address`


@contextlib.contextmanager
def ray_head(env: dict[str, str], *, num_cpus: int = 2):
    temp_dir = tempfile.mkdtemp(prefix="vlmray")
    port, dash = free_port(), free_port()
    ports = [f"--{name}={free_port()}" for name in AGENT_PORTS]
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={temp_dir}", *ports],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield Head(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
    finally:
        stop_head(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(temp_dir: str, port: int) -> None:
    """Kills the processes naming the head's temp dir or its GCS address, and their
    descendants (agents, workers, dashboard modules)."""
    import psutil

    def ours(p) -> bool:
        args = p.info["cmdline"] or []
        return any(temp_dir in a or a.endswith(f":{port}") for a in args)

    procs = {p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid() and ours(p)}
    for p in list(procs):
        try:
            procs.update(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
