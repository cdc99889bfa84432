"""End to end: while a 2-worker `vlm train` runs on a private local Ray, no process of the
run listens on a wildcard address (0.0.0.0 or ::): not the driver, not Ray's own
processes (GCS, raylet, dashboard, agents), not the training workers with their
torch.distributed store, gloo and Prometheus exporters. A wildcard listener would take
connections from the whole network, and the c10d store does not authenticate them."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from cluster.ray.session import LOOPBACK_ENV
from support.ports import free_port
from support.shardgen import TINY_MODEL, set_args, write_shards

pytestmark = pytest.mark.e2e
VLM = str(Path(sys.executable).parent / "vlm")
REPO = Path(__file__).resolve().parents[2]
WILDCARDS = ("0.0.0.0", "::", "")


def run_processes(root: psutil.Process, ray_dir: str) -> list[psutil.Process]:
    """The `vlm` process and its descendants, and every process of the Ray it started (they
    name its temp dir; one that detached from the tree would still be found)."""
    procs = {root}
    try:
        procs.update(root.children(recursive=True))
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        if any(ray_dir in a for a in p.info["cmdline"] or ()):
            procs.add(p)
    return list(procs)


def listeners(procs: list[psutil.Process], found: dict[tuple[int, str, int], str]) -> None:
    """Adds (pid, address, port) -> process name for every listening TCP socket and bound
    UDP socket of procs."""
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.laddr and c.status in (psutil.CONN_LISTEN, psutil.CONN_NONE):
                    found.setdefault((p.pid, c.laddr.ip, c.laddr.port), name)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def loopback_v4(ip: str) -> bool:
    """127.0.0.1, also as a dual-stack socket shows it (::ffff:127.0.0.1: gRPC's)."""
    addr = ipaddress.ip_address(ip)
    return str(getattr(addr, "ipv4_mapped", None) or addr) == "127.0.0.1"


def test_no_process_of_a_local_run_listens_on_a_wildcard(tmp_path):
    write_shards(tmp_path / "shards" / "train", n=128, per_shard=64)
    write_shards(tmp_path / "shards" / "heldout", n=16, per_shard=16, split="heldout")
    # Ray keeps its sockets and logs under a temp dir of this run's own (short: unix sockets)
    ray_dir = tempfile.mkdtemp(prefix="vlmnet")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_dir}
    for name in ("RAY_ADDRESS", *LOOPBACK_ENV):  # what `vlm train` sets by itself, not this test
        env.pop(name, None)
    proc = subprocess.Popen([VLM, "train", "--config", "configs/demo.yaml", "--set", f"run_dir={tmp_path}",
                             *set_args(*TINY_MODEL, "train.micro_batch_size=8", "train.steps=100",
                                       "train.log_every=10", "train.checkpoint_every=1000",
                                       "eval.every_steps=0", "metrics.port=0", "name=net-e2e")],
                            cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    seen: dict[tuple[int, str, int], str] = {}
    procs: list[psutil.Process] = []
    training = False
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            procs = run_processes(root, ray_dir)
            listeners(procs, seen)
            # both exporters up: the workers are past the process group and the engine
            training = training or all((tmp_path / "metrics" / f"rank{r}.json").is_file() for r in (0, 1))
            time.sleep(0.5)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # then Ray's processes outlive it: end them too, by pid
            for p in procs:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert proc.returncode == 0, out[-4000:]
    assert training, "never saw both workers' metrics exporters: the run did not get to train"
    table = "\n".join(f"{name} (pid {pid}) on {ip}:{port}" for (pid, ip, port), name in sorted(seen.items()))
    print(table)
    names = set(seen.values())
    # the scan saw the run's processes: the GCS and raylet, and both workers' store, gloo and exporter
    assert {"gcs_server", "raylet"} <= names, table
    assert any(n.startswith("ray::RayTrainWorker") for n in names), table
    wild = [f"{name} (pid {pid}) on {ip}:{port}" for (pid, ip, port), name in sorted(seen.items()) if ip in WILDCARDS]
    assert not wild, "listening on every interface:\n" + "\n".join(wild)
    assert all(loopback_v4(ip) for _, ip, _ in seen), table


RANK_SCRIPT = """
import json, psutil, torch, torch.distributed as dist
from vlm.train.rendezvous import ensure_process_group
rank, world = ensure_process_group()
t = torch.ones(1)
dist.all_reduce(t)
found = [[c.laddr.ip, c.laddr.port] for c in psutil.Process().net_connections(kind="inet")
         if c.status == psutil.CONN_LISTEN]
dist.barrier()
print(json.dumps({"rank": rank, "sum": t.item(), "listening": found}), flush=True)
dist.destroy_process_group()
"""


def test_ranks_outside_ray_listen_on_master_addr_only():
    """`python -m vlm.train.trainer` ranks started by any launcher (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT): rank 0 serves the store on MASTER_ADDR, and gloo stays on loopback too."""
    port = free_port()  # a loopback port nobody listens on
    env = {k: v for k, v in os.environ.items() if k not in LOOPBACK_ENV}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**env, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    reports = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert [r["sum"] for r in reports] == [2.0, 2.0]
    assert ["127.0.0.1", port] in reports[0]["listening"], reports[0]  # rank 0's store, on MASTER_ADDR only
    for r in reports:
        assert r["listening"] and all(loopback_v4(ip) for ip, _ in r["listening"]), r
