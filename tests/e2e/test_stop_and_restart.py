"""Stopping and restarts (docs/checkpoints.md, "Stopping and restarts"): SIGTERM to the
`vlm train` driver saves at the step the workers are in, prints it and exits 128+15, and a
resume from that checkpoint follows the uninterrupted trajectory bitwise; a second signal
ends the driver and its workers at once; SIGINT to `python -m vlm.train.trainer` saves; a SIGKILLed
Ray Train worker is restarted and the run ends as if nothing happened, one log row per step.
Tiny model, one Ray Train worker, a few dozen steps per run."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.shardgen import TINY_MODEL, set_args, shards_with_tokenizer
from vlm.train.steplog import truncate_log

REPO = Path(__file__).resolve().parents[2]
VLM = str(Path(sys.executable).parent / "vlm")
STEPS, EVERY = 40, 10
BASE = [*TINY_MODEL, "train.micro_batch_size=16", "train.num_workers=1", "train.log_every=1", "metrics.port=0",
        "eval.every_steps=0", "train.keep_checkpoints=0", "name=stop", f"train.steps={STEPS}",
        f"train.checkpoint_every={EVERY}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shards_with_tokenizer(tmp_path_factory.mktemp("stop"), n=240, per_shard=60)


def new_run(data, name: str) -> Path:
    root, _, tok = data
    d = root / name
    d.mkdir()
    shutil.copy(tok, d / "tokenizer.json")
    return d


def start(data, run_dir: Path, *sets: str, resume: str | None = None, engine: bool = False) -> subprocess.Popen:
    """`vlm train` (or `python -m vlm.train.trainer`, one rank) in its own session, its output in
    run_dir/out.N.txt."""
    cmd = [sys.executable, "-m", "vlm.train.trainer"] if engine else [VLM, "train"]
    cmd += ["--config", "configs/demo.yaml",
            *set_args(*BASE, f"run_dir={run_dir}", f"data.train_shards={data[1]}", *sets)]
    if resume:
        cmd += ["--resume", resume]
    out = open(run_dir / f"out.{time.monotonic_ns()}.txt", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def output(run_dir: Path) -> str:
    return "\n".join(f.read_text() for f in sorted(run_dir.glob("out.*.txt")))


def finish(proc: subprocess.Popen, timeout: float = 400) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rows(run_dir: Path) -> list[tuple[int, float]]:
    """(step, total loss) of every row of train_log.jsonl, in file order."""
    log = run_dir / "train_log.jsonl"
    if not log.is_file():
        return []
    return [(r["step"], r["loss/total"]) for r in map(json.loads, log.read_text().splitlines())]


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        logged = rows(run_dir)
        if logged and logged[-1][0] >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} was never logged (exit {proc.poll()}):\n{output(run_dir)[-4000:]}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def whole(data):
    """The uninterrupted run: step -> loss."""
    d = new_run(data, "whole")
    p = start(data, d)
    assert finish(p) == 0, output(d)[-4000:]
    return dict(rows(d))


@pytest.mark.e2e
def test_sigterm_to_vlm_train_saves_and_the_resume_is_bitwise_the_uninterrupted_run(data, whole):
    d = new_run(data, "term")
    p = start(data, d)
    wait_for_step(d, p, 3)  # before the first periodic checkpoint (step 10)
    p.send_signal(signal.SIGTERM)
    status = finish(p)
    out = output(d)
    assert status == 128 + signal.SIGTERM, out[-4000:]
    stopped = re.findall(r"^stopped at step (\d+); checkpoint (step_\d+)$", out, re.M)
    assert len(stopped) == 1, out[-4000:]
    step, tag = int(stopped[0][0]), stopped[0][1]
    assert 3 <= step < STEPS and tag == f"step_{step:08d}"
    assert (d / "checkpoints" / "latest").read_text() == tag
    assert (d / "checkpoints" / tag / "manifest.json").is_file()
    assert [s for s, _ in rows(d)] == list(range(1, step + 1))

    p = start(data, d, resume="latest")
    assert finish(p) == 0, output(d)[-4000:]
    assert f"at step {step} " in output(d)
    again = rows(d)
    assert [s for s, _ in again] == list(range(1, STEPS + 1))
    assert dict(again) == whole  # the same floats, every step


@pytest.mark.e2e
def test_a_second_signal_ends_the_driver_and_its_workers_at_once(data):
    d = new_run(data, "twice")
    p = start(data, d, "train.steps=100000", "train.checkpoint_every=100000")
    wait_for_step(d, p, 2)
    worker = json.loads((d / "metrics" / "rank0.json").read_text())["pid"]
    p.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    status = finish(p, timeout=30)
    took = time.monotonic() - t0
    out = output(d)
    assert status == 1, out[-4000:]
    assert "SIGINT again: exiting now" in out and "stopped at step" not in out, out[-4000:]
    assert took < 10, took
    deadline = time.monotonic() + 60
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(worker), "the worker outlived its driver"


@pytest.mark.e2e
def test_the_driver_gives_up_when_the_grace_period_ends(data):
    d = new_run(data, "grace")
    # half a second: less than Ray Train takes to wind the worker group down after a save
    p = start(data, d, "train.steps=100000", "train.checkpoint_every=100000", "train.stop_grace_s=0.5")
    wait_for_step(d, p, 2)
    p.send_signal(signal.SIGTERM)
    status = finish(p, timeout=60)
    out = output(d)
    assert status == 1, out[-4000:]
    assert "did not save and end within train.stop_grace_s=0.5s" in out and "stopped at step" not in out


@pytest.mark.e2e
def test_sigint_to_the_engine_saves_at_the_current_step(data):
    d = new_run(data, "engine")
    p = start(data, d, "train.steps=100000", "train.checkpoint_every=100000", "metrics.enabled=false",
              engine=True)
    wait_for_step(d, p, 3)
    p.send_signal(signal.SIGINT)
    status = finish(p, timeout=120)
    out = output(d)
    assert status == 128 + signal.SIGINT, out[-4000:]
    step = rows(d)[-1][0]
    assert f"stop requested (SIGINT): saving at step {step}" in out
    assert f"stopped at step {step}; checkpoint step_{step:08d}" in out
    assert (d / "checkpoints" / "latest").read_text() == f"step_{step:08d}"


@pytest.mark.e2e
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(data, whole):
    d = new_run(data, "killed")
    p = start(data, d)
    wait_for_step(d, p, EVERY + 3)  # a checkpoint, and steps past it that the resume runs again
    worker = json.loads((d / "metrics" / "rank0.json").read_text())["pid"]
    os.kill(worker, signal.SIGKILL)
    status = finish(p)
    out = output(d)
    assert status == 0, out[-4000:]
    assert "restarted after a failure (restart 1 of 3)" in out, out[-4000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+) ", out)]
    assert len(resumed) == 1 and resumed[0] >= EVERY and resumed[0] % EVERY == 0, out[-4000:]
    again = rows(d)
    assert [s for s, _ in again] == list(range(1, STEPS + 1))  # the re-run steps logged once
    assert dict(again) == whole


def test_truncate_log_keeps_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3, 4))
                   + '{"step": 5, "lo')  # cut short by a kill
    truncate_log(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    assert log.read_text().endswith("\n") and sorted(p.name for p in tmp_path.iterdir()) == ["train_log.jsonl"]
    truncate_log(log, 0)
    assert log.read_text() == ""
    truncate_log(tmp_path / "absent.jsonl", 3)
    assert not (tmp_path / "absent.jsonl").exists()
