"""deploy/local as its README runs it: start-head.sh and start-worker.sh, two Ray nodes on
this machine, each in a temp dir of its own. Nodes that shared one failed every first submit
of a new config (the worker node's runtime-env agent deleted the working dir the job's driver
ran in) and forwarded every worker line twice (each node's log monitor tailed both nodes'
worker logs). A first submit here must succeed and log each line once; nodes that share a
temp dir anyway are named in the job's log.

The first submit is the elastic run of issue 24: run_dir on S3, num_workers [1, 2], the
worker node killed mid-run and started again (test_elastic_run_on_s3_...)."""
from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from support.rayhead import cli_env, local_cluster
from support.s3 import moto_s3
from support.shardgen import TINY_MODEL, set_args, write_shards

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
# the elastic run: long enough that it is still running at one worker while the killed node
# starts again and Ray sees it (0.2 s a step here; the shrink took 30-75 s, the grow 15-45 s)
STEPS, ELASTIC_STEPS = 10, 400
SAMPLES = 240  # an epoch: 20 steps of 12
WAIT_S = 300  # every poll below is bounded by this (a loaded machine takes minutes)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus") / "train"
    write_shards(d, n=SAMPLES, per_shard=30)
    return d


def vlm(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vlm"), "cluster", *args, "--address", cluster.dashboard_url],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)


def submit(cluster, name: str, run_dir: Path | str, shards: Path, *sets: str) -> subprocess.CompletedProcess:
    """`vlm cluster submit` of a tiny run; `sets` override the defaults here."""
    return vlm(cluster, "submit", "--config", "configs/demo.yaml", "--name", name,
               *set_args(f"run_dir={run_dir}", f"data.train_shards={shards}", *TINY_MODEL,
                         "train.micro_batch_size=6", "metrics.port=0", "eval.every_steps=0", "train.log_every=5",
                         f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}", *sets))


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


def job_status(cluster, name: str) -> str:
    return json.loads(vlm(cluster, "status", name, "--json").stdout)["status"]


def s3_rows(fs, url: str) -> list[dict]:
    """The rows of a log in the bucket (uploaded at every checkpoint), [] before the first."""
    try:
        return [json.loads(line) for line in fs.cat_file(url).decode().splitlines()]
    except FileNotFoundError:
        return []


def wait_for(what: str, ready, job_alive, every: float = 0.5) -> None:
    """Polls ready() every `every` seconds (a read of the bucket) and job_alive() every tenth
    time (a `vlm cluster status`: a CLI start, a CPU-second, which polled often would slow
    the run on this 2-core machine)."""
    deadline = time.monotonic() + WAIT_S
    for poll in itertools.count():
        if ready():
            return
        assert poll % 10 or job_alive(), f"the job ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S}s"
        time.sleep(every)


def epoch_counts(fs, url: str) -> dict[str, Counter]:
    """Epoch -> how often each sample was trained on, over every rank's sample-id log."""
    counts: dict[str, Counter] = {}
    for path in fs.glob(f"{url.removeprefix('s3://')}/sample_ids/rank*.jsonl"):
        for row in s3_rows(fs, f"s3://{path}"):
            for sample in row["samples"]:
                epoch, _, name = sample.partition(" ")
                counts.setdefault(epoch, Counter())[name] += 1
    return counts


def test_elastic_run_on_s3_survives_losing_a_node_and_grows_back(shards, tmp_path):
    """The issue's acceptance test, with deploy/local's scripts: a head (1 CPU) and a worker
    node (1 CPU) of their own, run_dir on the loopback S3 server, `num_workers: [1, 2]`. The
    worker node is killed mid-run (SIGKILL to all its processes, as when its machine dies):
    the run goes on with one worker, from the newest checkpoint, at the same global batch;
    the node comes back and the run grows to two workers; it finishes. The job's first
    submit works and its log has each line once; every sample of an epoch is trained on once."""
    with moto_s3("elastic-runs") as (fs, _), local_cluster(cli_env(), tmp_path / "targets", worker_cpus=1) as cluster:
        status = ray_status(cluster)
        assert len(re.findall(r"^\s*1 node_", status, re.M)) == 2 and " 0.0/2.0 CPU" in status, status
        url = f"s3://elastic-runs/{uuid.uuid4().hex}/elastic"  # --name elastic: the same URL
        run = submit(cluster, "elastic", url, shards, f"train.steps={ELASTIC_STEPS}", "train.checkpoint_every=5",
                     "train.num_workers=[1, 2]", "train.global_batch_size=12", "train.resize_check_s=2",
                     "train.worker_start_timeout_s=20",
                     "train.log_every=1", "data.loader_workers=0", "data.log_sample_ids=true")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

        def alive() -> bool:
            return job_status(cluster, "elastic") in ("PENDING", "RUNNING")

        def rows() -> list[dict]:
            return s3_rows(fs, f"{url}/train_log.jsonl")

        wait_for("checkpoint at two workers", lambda: any(r["world_size"] == 2 and r["step"] >= 10 for r in rows()),
                 alive)
        killed_at, kill_time = max(r["step"] for r in rows()), time.time()
        assert cluster.kill_worker_node() > 0
        wait_for("step at one worker", lambda: any(r["world_size"] == 1 for r in rows()), alive)
        restarted = min(r["worker_start"] for r in rows() if r["world_size"] == 1) - kill_time
        print(f"node killed at step {killed_at}: the worker group restarted at one worker {restarted:.1f}s "
              f"later; its steps were in the bucket {time.time() - kill_time:.1f}s after the kill")
        cluster.start_worker_node()
        back_time = time.time()
        wait_for("step at two workers again",
                 lambda: any(r["world_size"] == 2 and r["step"] > killed_at for r in rows()), alive)
        grown = min(r["worker_start"] for r in rows() if r["world_size"] == 2 and r["step"] > killed_at) - back_time
        print(f"worker node started again: the group grew to two workers {grown:.1f}s later")
        wait_for("the end of the job", lambda: not alive(), lambda: True, every=3)
        assert job_status(cluster, "elastic") == "SUCCEEDED"
        logs = vlm(cluster, "logs", "elastic")
        log_rows, counts = rows(), epoch_counts(fs, url)
    assert logs.returncode == 0, logs.stderr
    out = logs.stdout
    assert out.count("run elastic finished") == 1 and "share one temp dir" not in out, out[-3000:]
    # the workers ran on the scripts' loopback addresses, never the machine's outward one
    assert set(re.findall(r"\(ip=([\d.]+), pid=", out)) == {"127.0.0.2", "127.0.0.3"}, out[-3000:]
    shrink = re.findall(r"resize: world size 2 -> 1 at step (\d+): gradient accumulation 1 -> 2 per worker, "
                        r"global batch 12 unchanged", out)
    grow = re.findall(r"resize: world size 1 -> 2 at step (\d+): gradient accumulation 2 -> 1 per worker, "
                      r"global batch 12 unchanged", out)
    assert len(shrink) == 1 and len(grow) == 1, out[-6000:]
    assert "worker group restarted after a failure (restart 1 of 3), 1 worker(s)" in out
    assert "worker group restarted, grown from 1 to 2 worker(s)" in out
    # one row per step, each a global batch of 12, at 2 workers, then 1, then 2 again
    assert [r["step"] for r in log_rows] == list(range(1, ELASTIC_STEPS + 1))
    assert all(r["samples"] == 12 * r["step"] for r in log_rows)
    sizes = [r["world_size"] for r in log_rows]
    assert sizes[0] == 2 and sizes[-1] == 2 and 1 in sizes
    assert sizes.index(1) == int(shrink[0]) and max(i for i, n in enumerate(sizes) if n == 1) < int(grow[0]) + 1
    # every epoch's samples once each; the last two may be cut short by the run's end (a
    # re-split epoch need not divide evenly, so one rank may be an epoch ahead)
    epochs = sorted(counts, key=int)
    assert len(epochs) >= 3, epochs
    for epoch in epochs:
        assert set(counts[epoch].values()) == {1}, (epoch, counts[epoch].most_common(3))
    assert all(len(counts[e]) == SAMPLES for e in epochs[:-2]), {e: len(counts[e]) for e in epochs}
    print(f"shrink at step {shrink[0]}, grow at step {grow[0]}; epochs {len(epochs)}: "
          f"{[len(counts[e]) for e in epochs]} distinct samples, none twice")


def test_nodes_in_one_temp_dir_are_named_in_the_jobs_log(shards, tmp_path):
    """What the scripts prevent and a user's own `ray start` can still do: the job says so."""
    with local_cluster(cli_env(), tmp_path / "targets", one_temp_dir=True) as cluster:
        ray_status(cluster)
        assert submit(cluster, "shared", tmp_path / "shared", shards).returncode == 0
        wait_for("the end of the job", lambda: job_status(cluster, "shared") not in ("PENDING", "RUNNING"),
                 lambda: True, every=3)
        logs = vlm(cluster, "logs", "shared").stdout
    assert "vlm: warning: 2 Ray nodes on " in logs and "share one temp dir" in logs, logs[-3000:]
