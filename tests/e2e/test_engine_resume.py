"""Checkpoints and resume of the real engine, launched without Ray (`python -m vlm.train.trainer`
per rank, as torchrun would): SIGKILL mid-run and an exact resume, a change of world size
in both directions, a corrupt newest checkpoint, SIGTERM, and checkpoints on S3 (moto's
server on 127.0.0.1). Tiny model, a few dozen steps per run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from support.shardgen import TINY_MODEL, set_args, shards_with_tokenizer
from support.ports import free_port
from support.s3 import moto_s3

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
# global batch 32 with the gradient cache, so the contrastive batch is the same at any
# world size (and the loss comparable); it learns visibly within 16 steps
BASE = [*TINY_MODEL, "train.micro_batch_size=16", "train.global_batch_size=32", "train.grad_cache=true",
        "optim.lr=3e-3", "optim.warmup_steps=3", "train.log_every=1", "metrics.enabled=false",
        "eval.every_steps=0", "train.zero_stage=2", "train.keep_checkpoints=0", "data.log_sample_ids=true"]
STEPS, EVERY = 16, 6
SAMPLES = 480  # in `data`: an epoch is 15 steps of 32


def launch(run_dir: Path, data: Path, world: int, *sets: str, resume: str | None = None,
           env: dict | None = None) -> list[subprocess.Popen]:
    """`world` processes of one run, each a rank, as a torchrun-style launcher starts them."""
    port = free_port()
    args = [sys.executable, "-m", "vlm.train.trainer", "--config", "configs/demo.yaml",
            *set_args(*BASE, f"run_dir={run_dir}", f"data.train_shards={data}", *sets)]
    if resume:
        args += ["--resume", resume]
    procs = []
    for rank in range(world):
        e = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
             "LOCAL_WORLD_SIZE": str(world),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        log = open(run_dir / f"rank{rank}.{time.monotonic_ns()}.out", "w")
        procs.append(subprocess.Popen(args, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def run(run_dir: Path, data: Path, world: int, *sets: str, resume: str | None = None, env=None,
        timeout: float = 300) -> str:
    """Runs to the end; returns every rank's output of this and earlier launches."""
    procs = launch(run_dir, data, world, *sets, resume=resume, env=env)
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = "\n".join(f.read_text() for f in sorted(run_dir.glob("rank*.out")))
    assert all(p.returncode == 0 for p in procs), out[-6000:]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """step -> total loss, the last record of each step (a resumed run logs steps again)."""
    out = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss/total"]
    return out


def epoch_counts(run_dir: Path) -> dict[str, Counter]:
    """Epoch -> how often each sample was trained on, from every rank's sample-id log
    (data.log_sample_ids); also checks that each step has one row per rank of its size."""
    counts: dict[str, Counter] = {}
    rows: dict[int, list[dict]] = {}
    for f in (run_dir / "sample_ids").glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(row["step"], []).append(row)
            for sample in row["samples"]:
                epoch, _, name = sample.partition(" ")
                counts.setdefault(epoch, Counter())[name] += 1
    for step, of_step in rows.items():
        assert sorted(r["rank"] for r in of_step) == list(range(of_step[0]["world_size"])), (step, of_step)
    return counts


def new_run(tmp: Path, name: str, tokenizer: Path) -> Path:
    d = tmp / name
    d.mkdir()
    shutil.copy(tokenizer, d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shards_with_tokenizer(tmp_path_factory.mktemp("engine"), n=480, per_shard=60)


@pytest.fixture(scope="module")
def uninterrupted(data):
    root, shards, tok = data
    d = new_run(root, "whole", tok)
    run(d, shards, 2, f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}")
    return d


@pytest.fixture(scope="module")
def uninterrupted_2_workers(data):
    root, shards, tok = data
    d = new_run(root, "whole_2_workers", tok)
    run(d, shards, 2, f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "data.loader_workers=2")
    return d


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_follows_the_uninterrupted_trajectory_bitwise(data, request, workers):
    """With the batches made in the training process and by 2 data workers per rank (each
    rank's batches come from the workers in turn, and every worker resumes where the
    batches the run took left it, not where its prefetching got to)."""
    uninterrupted = request.getfixturevalue("uninterrupted_2_workers" if workers else "uninterrupted")
    root, shards, tok = data
    d = new_run(root, f"killed_{workers}_workers", tok)
    sets = (f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", f"data.loader_workers={workers}")
    procs = launch(d, shards, 2, *sets)
    latest = d / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not latest.is_file() and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert latest.is_file(), "no checkpoint before the deadline"
    assert max(losses(d)) < STEPS, "the run finished before it was killed: nothing was tested"
    saved = int(latest.read_text().removeprefix("step_"))
    out = run(d, shards, 2, *sets, resume="latest")
    assert "resumed from" in out and f"at step {saved}" in out
    assert f"data: {workers} loader worker(s) per rank" in out
    whole, again = losses(uninterrupted), losses(d)
    assert sorted(again) == list(range(1, STEPS + 1))
    for step in range(saved + 1, STEPS + 1):  # after the resume: the same floats
        assert again[step] == whole[step], f"step {step}: {again[step]!r} != {whole[step]!r}"
    # the sample-id logs lost the killed steps past the checkpoint: the same samples, once each
    assert epoch_counts(d) == epoch_counts(uninterrupted)
    assert sum(epoch_counts(d)["0"].values()) == SAMPLES
    assert whole[STEPS] < whole[1]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_carries_the_optimizer_state(data, uninterrupted, before, after):
    root, shards, tok = data
    if before == 2:
        d = root / "shrink"
        shutil.copytree(uninterrupted, d)
    else:
        d = new_run(root, "grow", tok)
        run(d, shards, 1, f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}")
    # past the end of the second epoch: the re-split rest of an epoch need not divide evenly
    # among the new ranks, so one may begin the next epoch a step or two before another
    start, end = STEPS, 2 * SAMPLES // 32 + 2
    out = run(d, shards, after, f"train.steps={end}", resume="latest")
    assert f"saved by {before} worker(s)" in out and "universal format" in out
    assert f"optimizer state restored (Adam step {start})" in out
    assert f"resize: world size {before} -> {after} at step {start}: " in out
    assert "global batch 32 unchanged" in out
    curve = losses(d)
    assert sorted(curve) == list(range(1, end + 1))
    # the epoch the resize split: the rest re-split among the new ranks, each sample once
    counts = epoch_counts(d)
    assert sorted(counts) == ["0", "1", "2"]
    for epoch, seen in counts.items():
        assert set(seen.values()) == {1}, (epoch, seen.most_common(3))  # none twice in an epoch
        assert epoch == "2" or len(seen) == SAMPLES, (epoch, len(seen))  # and none skipped
    learned = curve[1] - curve[start]
    assert learned > 0.3, curve  # it trained, so a restart from scratch would show
    # continuous: the step after the change stays near where the run was, not back at the start
    assert abs(curve[start + 1] - curve[start]) < 0.5 * learned, curve


def test_corrupt_newest_checkpoint_falls_back_and_says_which_file(data, uninterrupted):
    root, shards, tok = data
    d = root / "corrupt"
    shutil.copytree(uninterrupted, d)
    newest = d / "checkpoints" / f"step_{STEPS:08d}"
    victim = next(newest.glob("zero_pp_rank_1_*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    out = run(d, shards, 2, f"train.steps={STEPS + 2}", resume="latest")
    assert f"{victim.name} does not match its manifest" in out
    assert "resumed from" in out and f"at step {STEPS // EVERY * EVERY}" in out


def test_sigterm_saves_a_checkpoint_and_stops(data):
    root, shards, tok = data
    d = new_run(root, "term", tok)
    procs = launch(d, shards, 1, "train.steps=100000", "train.checkpoint_every=100000")
    log = d / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and procs[0].poll() is None and \
            (not log.is_file() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGTERM)
    procs[0].wait(timeout=120)
    out = "\n".join(f.read_text() for f in d.glob("rank*.out"))
    assert procs[0].returncode == 128 + signal.SIGTERM, out[-4000:]  # stopped by a signal, saved
    step = max(losses(d))
    assert "stop requested (SIGTERM)" in out
    assert (d / "checkpoints" / "latest").read_text() == f"step_{step:08d}"


@pytest.fixture(scope="module")
def s3():
    with moto_s3("ckpts") as (fs, env):
        yield fs, env


def test_checkpoints_on_s3_save_and_resume(data, s3):
    fs, env = s3
    root, shards, tok = data
    d = new_run(root, "s3run", tok)
    url = "s3://ckpts/run1"
    run(d, shards, 1, "train.steps=6", "train.checkpoint_every=3", f"train.checkpoint_dir={url}", env=env)
    assert fs.cat_file("ckpts/run1/latest").decode() == "step_00000006"
    manifest = json.loads(fs.cat_file("ckpts/run1/step_00000006/manifest.json"))
    assert "trainer_state.pt" in manifest["files"] and any(n.endswith("optim_states.pt") for n in manifest["files"])
    assert not (d / "checkpoints").exists()  # nothing kept locally but the staging area, emptied
    # corrupt the newest on S3: the resume downloads, detects it and takes the previous one
    fs.pipe_file("ckpts/run1/step_00000006/trainer_state.pt", b"garbage")
    out = run(d, shards, 1, "train.steps=8", f"train.checkpoint_dir={url}", resume="latest", env=env)
    assert "trainer_state.pt does not match its manifest" in out
    assert "at step 3" in out
    assert fs.cat_file("ckpts/run1/latest").decode() == "step_00000008"


def test_optimizer_offload_trains_and_resumes(data):
    root, shards, tok = data
    d = new_run(root, "offload", tok)
    run(d, shards, 1, "train.steps=3", "train.checkpoint_every=2", "train.zero_stage=3",
        "train.offload_optimizer=true")
    out = run(d, shards, 1, "train.steps=4", "train.zero_stage=3", "train.offload_optimizer=true", resume="latest")
    assert "at step 3" in out and "optimizer state restored (Adam step 3)" in out
    assert sorted(losses(d)) == [1, 2, 3, 4]
