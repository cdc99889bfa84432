"""`vlm cluster` against a real `ray start --head` on 127.0.0.1 (job server included):
submit, idempotent resubmit, logs, metrics served while running, a SIGKILLed worker
that the job survives by resuming, and a stop that ends in a final checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from support.rayhead import cli_env, ray_head
from support.shardgen import TINY_MODEL, set_args, write_shards
from vlm.checkpoint.resolve import resolve
from vlm.checkpoint.safeload import load_trainer_state

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
TINY = [*TINY_MODEL, "train.micro_batch_size=6", "metrics.port=0", "eval.every_steps=0", "train.log_every=5"]
WAIT_S = 300  # every poll below is bounded by this


@pytest.fixture(scope="module")
def head():
    with ray_head(cli_env()) as h:
        yield h.dashboard_url


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus") / "train"
    write_shards(d, n=120, per_shard=30)
    return d


def vlm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vlm"), "cluster", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=cli_env())


def submit(head, name, run_dir, shards, *overrides) -> subprocess.CompletedProcess:
    out = vlm("submit", "--address", head, "--config", "configs/demo.yaml", "--name", name,
              *set_args(f"run_dir={run_dir}", f"data.train_shards={shards}", *TINY, *overrides))
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def status(head, name) -> dict:
    out = vlm("status", name, "--address", head, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def wait_status(head, name, want: set[str]) -> str:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        now = status(head, name)["status"]
        if now in want or now in {"SUCCEEDED", "FAILED", "STOPPED"}:
            return now
        time.sleep(1)
    raise AssertionError(f"job {name} still {now} after {WAIT_S}s")


def wait_for(predicate, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def logs(head, name) -> str:
    out = vlm("logs", name, "--address", head)
    assert out.returncode == 0, out.stderr
    return out.stdout


def scrape(run_dir: Path) -> str | None:
    """The /metrics text of rank 0 while it runs (None when not up yet, or gone)."""
    try:
        url = json.loads((run_dir / "metrics" / "rank0.json").read_text())["url"]
        assert url.startswith("http://127.0.0.1:")
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except (OSError, ValueError, KeyError):
        return None


def test_submit_idempotent_logs_checkpoints_metrics(head, shards, tmp_path):
    run_dir = tmp_path / "tiny"
    first = submit(head, "tiny", run_dir, shards, "train.steps=200", "train.checkpoint_every=50")
    assert "submitted vlm-tiny" in first.stdout and str(run_dir) in first.stdout
    again = submit(head, "tiny", run_dir, shards, "train.steps=200", "train.checkpoint_every=50")
    assert "already submitted, not starting another" in again.stdout
    assert f"exec {BIN}/python" in status(head, "tiny")["entrypoint"]  # the submitter's, not PATH's

    # metrics are served by the running workers
    text = wait_for(lambda: (t := scrape(run_dir)) and "vlm_train_steps_total{" in t and t, "rank 0's metrics")
    assert 'vlm_train_steps_total{rank="0",run="tiny"}' in text  # --name is the run label, not the config's name
    assert wait_status(head, "tiny", {"SUCCEEDED"}) == "SUCCEEDED", logs(head, "tiny")[-3000:]
    # the name again with another config: refused, naming the keys (the job's metadata keeps its config)
    changed = vlm("submit", "--address", head, "--config", "configs/demo.yaml", "--name", "tiny",
                  *set_args(f"run_dir={run_dir}", f"data.train_shards={shards}", *TINY, "train.steps=300",
                            "train.checkpoint_every=50", "model.embed_dim=48"))
    assert changed.returncode == 2, changed.stdout + changed.stderr
    assert "already submitted (vlm-tiny: SUCCEEDED" in changed.stderr
    assert "train.steps: 200 → 300" in changed.stderr and "model.embed_dim: 32 → 48" in changed.stderr

    listed = json.loads(vlm("list", "--address", head, "--json").stdout)
    assert [j["submission_id"] for j in listed if j["run"] == "tiny"] == ["vlm-tiny"]  # one run
    text = logs(head, "tiny")
    assert "run tiny finished; newest checkpoint step_00000200" in text
    for step in range(5, 201, 5):  # every worker line once (a node's log monitor forwards only its own)
        assert text.count(f" step {step}/200 loss ") == 1, text[-3000:]
    assert load_trainer_state(resolve(str(run_dir)))["step"] == 200
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 201, 5))


def test_killed_worker_restarts_and_resumes(head, shards, tmp_path):
    run_dir = tmp_path / "killed"
    submit(head, "killed", run_dir, shards, "train.steps=300", "train.checkpoint_every=20")
    ckpts = run_dir / "checkpoints"
    wait_for(lambda: (ckpts / "latest").is_file(), "the first checkpoint")
    victim = json.loads((run_dir / "metrics" / "rank1.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    assert wait_status(head, "killed", {"SUCCEEDED"}) == "SUCCEEDED", logs(head, "killed")[-3000:]

    text = logs(head, "killed")
    assert "[FailurePolicy] RETRY" in text
    resumed = [line for line in text.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, text[-3000:]
    at = int(resumed[0].split(" at step ")[1].split()[0])
    assert at >= 20 and at % 20 == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    # the steps after the restart continue from the checkpoint, not from step 0, and the
    # rows the killed group logged past that checkpoint are dropped: one row per step
    assert steps == list(range(5, 301, 5))
    assert all(steps.count(s) == 1 for s in range(5, at + 1, 5))
    assert load_trainer_state(resolve(str(run_dir)))["step"] == 300


def test_stop_ends_stopped_with_final_checkpoint(head, shards, tmp_path):
    run_dir = tmp_path / "stopped"
    submit(head, "stopped", run_dir, shards, "train.steps=100000", "train.checkpoint_every=50000")
    wait_for(lambda: (run_dir / "train_log.jsonl").is_file(), "the first steps")
    out = vlm("stop", "stopped", "--address", head)
    assert out.returncode == 0 and "STOPPED" in out.stdout, out.stdout + out.stderr
    text = logs(head, "stopped")
    saving = [line for line in text.splitlines() if "stop requested" in line]
    assert len(saving) == 1, text[-3000:]
    at = int(saving[0].rsplit("saving at step ", 1)[1])
    state = load_trainer_state(resolve(str(run_dir)))
    assert 0 < state["step"] == at < 50000
    assert status(head, "stopped")["status"] == "STOPPED"
    # submitting the stopped run again resumes it under a new submission id
    again = submit(head, "stopped", run_dir, shards, "train.steps=100000", "train.checkpoint_every=50000")
    assert "submitted vlm-stopped-2" in again.stdout and "resumes" in again.stdout
    wait_for(lambda: "resumed from" in logs(head, "stopped"), "the resubmitted job to resume")
    assert f"at step {at}" in logs(head, "stopped")
    assert vlm("stop", "stopped", "--address", head).returncode == 0


def test_the_jobs_interpreter_is_named_when_the_node_lacks_it(head, shards, tmp_path):
    """The entrypoint runs the submitter's interpreter (the tests above: this venv's, not on
    PATH) or --python's; one the node lacks fails the job with a message naming it."""
    missing = "/nonexistent/venv/bin/python"
    out = vlm("submit", "--address", head, "--config", "configs/demo.yaml", "--name", "nopython",
              "--python", missing, *set_args(f"run_dir={tmp_path / 'nopython'}", f"data.train_shards={shards}", *TINY))
    assert out.returncode == 0, out.stdout + out.stderr
    assert wait_status(head, "nopython", set()) == "FAILED"
    record = status(head, "nopython")
    assert record["entrypoint"].startswith("if [ ! -x /nonexistent/venv/bin/python ]")
    assert f"vlm: error: the job interpreter {missing} is not an executable on this cluster node" \
        in record["message"]
    relative = vlm("submit", "--address", head, "--config", "configs/demo.yaml", "--python", "python3")
    assert relative.returncode == 1 and "--python python3: give the interpreter's absolute path" in relative.stderr
