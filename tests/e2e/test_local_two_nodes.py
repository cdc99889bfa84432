"""deploy/local as its README runs it: start-head.sh and start-worker.sh, two Ray nodes on
this machine, each in a temp dir of its own. Nodes that shared one failed every first submit
of a new config (the worker node's runtime-env agent deleted the working dir the job's driver
ran in) and forwarded every worker line twice (each node's log monitor tailed both nodes'
worker logs). A first submit here must succeed and log each line once; nodes that share a
temp dir anyway are named in the job's log."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.rayhead import cli_env, local_cluster
from support.shardgen import TINY_MODEL, set_args, write_shards

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
STEPS = 10
WAIT_S = 300  # every poll below is bounded by this (a loaded machine takes minutes)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus") / "train"
    write_shards(d, n=60, per_shard=30)
    return d


def vlm(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vlm"), "cluster", *args, "--address", cluster.dashboard_url],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)


def submit(cluster, name: str, run_dir: Path, shards: Path, *more: str) -> subprocess.CompletedProcess:
    return vlm(cluster, "submit", "--config", "configs/demo.yaml", "--name", name, *more,
               *set_args(f"run_dir={run_dir}", f"data.train_shards={shards}", *TINY_MODEL,
                         "train.micro_batch_size=6", "metrics.port=0", "eval.every_steps=0", "train.log_every=5",
                         f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}"))


def ray_status(cluster) -> str:
    """`ray status` as the README runs it (the head's address file is in its own temp dir
    now), once the autoscaler's report shows both nodes."""
    deadline = time.monotonic() + WAIT_S
    while True:
        out = subprocess.run([str(BIN / "ray"), "status", "--address", cluster.address],
                             env={**cli_env(), "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        if len(re.findall(r"^\s*1 node_[0-9a-f]+$", out.stdout, re.M)) == 2 or time.monotonic() > deadline:
            return out.stdout
        time.sleep(1)


def test_first_submit_runs_and_logs_each_line_once(shards, tmp_path):
    with local_cluster(cli_env(), tmp_path / "targets") as cluster:
        status = ray_status(cluster)
        assert len(re.findall(r"^\s*1 node_", status, re.M)) == 2 and " 0.0/3.0 CPU" in status, status
        run = submit(cluster, "two", tmp_path / "two", shards, "--wait")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        logs = vlm(cluster, "logs", "two")
    assert logs.returncode == 0, logs.stderr
    assert "run two finished" in logs.stdout and "share one temp dir" not in logs.stdout
    for step in range(5, STEPS + 1, 5):
        assert logs.stdout.count(f" step {step}/{STEPS} loss ") == 1, logs.stdout[-3000:]


def test_nodes_in_one_temp_dir_are_named_in_the_jobs_log(shards, tmp_path):
    """What the scripts prevent and a user's own `ray start` can still do: the job says so."""
    with local_cluster(cli_env(), tmp_path / "targets", one_temp_dir=True) as cluster:
        ray_status(cluster)
        assert submit(cluster, "shared", tmp_path / "shared", shards).returncode == 0
        deadline = time.monotonic() + WAIT_S
        while json.loads(vlm(cluster, "status", "shared", "--json").stdout)["status"] in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, "the job did not end"
            time.sleep(1)
        logs = vlm(cluster, "logs", "shared").stdout
    assert "vlm: warning: 2 Ray nodes on " in logs and "share one temp dir" in logs, logs[-3000:]
