"""End to end: `vlm train` on 2 Ray Train workers with DeepSpeed ZeRO-2 (gloo on CPU),
metrics scraped while it trains, checkpoints with a manifest, a resume that continues the
step count, and `vlm eval` on the result. Small: a tiny model and a few hundred samples."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from support.shardgen import TINY_MODEL, set_args, write_shards
from vlm.checkpoint.safeload import load, load_trainer_state
from vlm.checkpoint.verify import verify

pytestmark = pytest.mark.e2e
VLM = str(Path(sys.executable).parent / "vlm")
REPO = Path(__file__).resolve().parents[2]
TINY = [*TINY_MODEL, "train.micro_batch_size=8", "train.log_every=10", "metrics.port=0", "name=e2e"]
METRICS = ["vlm_train_samples_total", "vlm_train_steps_total", "vlm_train_loss", "vlm_train_learning_rate",
           "vlm_train_step_duration_seconds", "vlm_train_data_wait_seconds"]


def vlm(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([VLM, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            out[name_labels] = float(value)
    return out


def scrape_until_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 240) -> dict[int, str]:
    """Polls each rank's endpoint while the run is alive; returns the first scrape per rank
    that shows at least one finished step."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < 2 and time.monotonic() < deadline and proc.poll() is None:
        for rank in (0, 1):
            f = run_dir / "metrics" / f"rank{rank}.json"
            if rank in seen or not f.is_file():
                continue
            url = json.loads(f.read_text())["url"]
            assert url.startswith("http://127.0.0.1:")
            try:
                body = urllib.request.urlopen(url, timeout=2).read().decode()
            except OSError:
                continue
            if parse_metrics(body).get(f'vlm_train_steps_total{{rank="{rank}",run="e2e"}}', 0) >= 1:
                seen[rank] = body
        time.sleep(0.1)
    return seen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    write_shards(run_dir / "shards" / "train", n=240, per_shard=60)
    write_shards(run_dir / "shards" / "heldout", n=48, per_shard=48, split="heldout")
    proc = vlm("train", "--config", "configs/demo.yaml", "--set", f"run_dir={run_dir}",
               "--set", "train.steps=120", "--set", "train.checkpoint_every=50", "--set", "eval.every_steps=60",
               *set_args(*TINY))
    scrapes = scrape_until_training(run_dir, proc)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return run_dir, scrapes, out


def test_metrics_served_by_both_ranks_during_training(trained):
    _, scrapes, out = trained
    assert set(scrapes) == {0, 1}, "did not see both ranks' metrics while training"
    for rank, body in scrapes.items():
        for name in METRICS:
            assert f"\n{name}" in "\n" + body, f"rank {rank} lacks {name}"
        m = parse_metrics(body)
        assert m[f'vlm_train_loss{{objective="clip_infonce",rank="{rank}",run="e2e"}}'] > 0
        assert m[f'vlm_train_samples_total{{rank="{rank}",run="e2e"}}'] >= 8
    assert "Prometheus metrics at http://127.0.0.1:" in out


def test_checkpoints_are_complete_and_latest_is_newest(trained):
    run_dir, _, _ = trained
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_00000120"
    for tag in ("step_00000050", "step_00000100", "step_00000120"):
        ckpt = root / tag
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert manifest["step"] == int(tag[5:])
        # DeepSpeed's sharded optimizer state: one file per rank under ZeRO-2
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "mp_rank_00_model_states.pt", "trainer_state.pt"} <= set(manifest["files"])
        verify(ckpt)
    state = load_trainer_state(root / "step_00000120")
    assert state["step"] == 120 and state["samples_seen"] == 120 * 16 and state["world_size"] == 2
    assert [r["reader"]["rank"] for r in state["ranks"]] == [0, 1]
    assert (run_dir / "config.yaml").is_file()


def test_corrupt_checkpoint_is_refused(trained, tmp_path):
    import shutil
    run_dir, _, _ = trained
    copy = tmp_path / "step_00000050"
    shutil.copytree(run_dir / "checkpoints" / "step_00000050", copy)
    with open(copy / "trainer_state.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="trainer_state.pt does not match its manifest"):
        verify(copy)


def test_resume_continues_the_step_count(trained):
    run_dir, _, _ = trained
    before = load(run_dir / "checkpoints" / "step_00000120" / "mp_rank_00_model_states.pt")["module"]
    proc = vlm("train", "--config", "configs/demo.yaml", "--set", f"run_dir={run_dir}", "--resume", "latest",
               "--set", "train.steps=140", "--set", "train.checkpoint_every=50",
               *set_args(*TINY))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out and "at step 120" in out
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000140"
    state = load_trainer_state(run_dir / "checkpoints" / "step_00000140")
    assert state["step"] == 140 and state["samples_seen"] == 140 * 16
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log][-3:] == [120, 130, 140]
    after = load(run_dir / "checkpoints" / "step_00000140" / "mp_rank_00_model_states.pt")["module"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained further


def test_train_refuses_to_restart_over_checkpoints(trained):
    run_dir, _, _ = trained
    proc = vlm("train", "--config", "configs/demo.yaml", "--set", f"run_dir={run_dir}",
               *set_args(*TINY))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "--resume latest" in out


def test_eval_cli_on_the_trained_run(trained):
    run_dir, _, _ = trained
    proc = vlm("eval", "--checkpoint", str(run_dir), "--output", str(run_dir / "eval.json"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "zero-shot top-1:" in out and "chance 0.0833" in out
    res = json.loads((run_dir / "eval.json").read_text())
    assert res["num_images"] == 48 and 0 <= res["zeroshot"]["acc1"] <= 1
    assert set(res["retrieval"]) >= {"image_retrieval_recall@1", "text_retrieval_recall@10"}


def test_periodic_eval_on_two_ranks_equals_offline_eval(trained):
    run_dir, _, out = trained
    log = [json.loads(line) for line in (run_dir / "eval_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [60, 120]
    assert "eval at step 60" in out
    # the step-120 evaluation ran on 2 ranks, each embedding half of the held-out shards,
    # on the weights that were then saved as step_00000120: one process must agree
    proc = vlm("eval", "--checkpoint", str(run_dir / "checkpoints" / "step_00000120"),
               "--output", str(run_dir / "eval120.json"))
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    offline = json.loads((run_dir / "eval120.json").read_text())
    for task, key in (("zeroshot", "acc1"), ("zeroshot", "acc5"), ("retrieval", "text_retrieval_recall@5"),
                      ("retrieval", "image_retrieval_recall@1")):
        assert log[1][task][key] == pytest.approx(offline[task][key], abs=1e-6), (task, key)
