"""A real `ray start --head` on 127.0.0.1 for the end-to-end tests, or deploy/local's head
and worker node, and stopping only them.

Every port is its own (another Ray on this machine, such as a running demo, holds the
default ones, and the job server needs its own agent), and so is the temp dir (short: Ray
puts unix sockets under it). `ray stop --force` would kill every Ray of the user on the
machine; `stop_head` kills the processes of this temp dir and their descendants only."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from support.ports import free_port

BIN = Path(sys.executable).parent
LOCAL = Path(__file__).resolve().parents[2] / "deploy" / "local"
AGENT_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
               "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port")


def cli_env() -> dict[str, str]:
    """The environment of a user's shell for `vlm cluster` and the nodes: without the
    RAY_AUTH_MODE an in-process ray.init of the session sets (the CLI finds the token as a
    shell would), and without this venv's bin on PATH, so that a job that ran a bare
    `python` would get another interpreter and fail."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != BIN.resolve())
    return env


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


@dataclass
class LocalCluster(Head):
    """deploy/local's two nodes; the worker node can be killed and started again."""
    common: dict[str, str]
    worker: dict[str, str]
    temp_dir: str
    starts: int = 0

    def start_worker_node(self) -> None:
        """start-worker.sh, as a user runs it (again after a kill: a fresh temp dir, as on a
        replacement machine)."""
        self.starts += 1
        temp = self.worker["RAY_TEMP_DIR"] + ("" if self.starts == 1 else str(self.starts))
        _script("start-worker.sh", {**self.common, **self.worker, "RAY_TEMP_DIR": temp})

    def kill_worker_node(self) -> int:
        """SIGKILLs every process of the worker node (its raylet, agents and Ray workers, the
        training worker among them), as when its machine dies; the number killed."""
        worker_temp = f"{self.temp_dir}/w"
        return kill_tree(lambda args: any(worker_temp in a for a in args))


def _script(name: str, env: dict[str, str]) -> None:
    res = subprocess.run([str(LOCAL / name)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"


@contextlib.contextmanager
def local_cluster(env: dict[str, str], sd_dir: Path, *, one_temp_dir: bool = False, worker_cpus: int = 2):
    """deploy/local's start-head.sh (1 CPU) and start-worker.sh (`worker_cpus`), as a user
    runs them, each node with its own ports and its own temp dir under one of this test's
    (with `one_temp_dir`, the worker node in the head's, as a `ray start` without --temp-dir),
    on the scripts' loopback addresses (head 127.0.0.2, worker 127.0.0.3)."""
    temp_dir = tempfile.mkdtemp(prefix="vlmray")
    port, dash = free_port(), free_port()
    # without the tests' loopback switch, which makes a head refuse other nodes
    common = {**{k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},
              "RAY": str(BIN / "ray"), "VLM_METRICS_SD_DIR": str(sd_dir)}
    head = {"RAY_PORT": port, "DASHBOARD_PORT": dash, "METRICS_PORT": free_port(), "AGENT_PORT": free_port(),
            "CLIENT_PORT": free_port(), "RAY_TEMP_DIR": f"{temp_dir}/h"}
    worker = {"HEAD_ADDRESS": f"127.0.0.2:{port}", "METRICS_PORT": free_port(), "AGENT_PORT": free_port(),
              "RAY_TEMP_DIR": f"{temp_dir}/{'h' if one_temp_dir else 'w'}", "WORKER_CPUS": worker_cpus}
    cluster = LocalCluster(f"127.0.0.2:{port}", f"http://127.0.0.1:{dash}", common,
                           {k: str(v) for k, v in worker.items()}, temp_dir)
    try:
        _script("start-head.sh", {**common, **{k: str(v) for k, v in head.items()}})
        cluster.start_worker_node()
        yield cluster
    finally:
        stop_head(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(temp_dir: str, port: int) -> None:
    """Kills the processes naming the head's temp dir or its GCS address, and their
    descendants (agents, workers, dashboard modules)."""
    kill_tree(lambda args: any(temp_dir in a or a.endswith(f":{port}") for a in args))


def kill_tree(ours: Callable[[list[str]], bool]) -> int:
    """SIGKILLs the processes (other than this one) whose command line `ours` accepts, and
    their descendants; waits for them. The number killed."""
    import psutil

    procs = {p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid() and ours(p.info["cmdline"] or [])}
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
    return len(procs)
