"""End to end: the real Prometheus server (`vlm monitor`'s API) scrapes a 2-worker `vlm
train` run found through the run's file_sd targets; its HTTP API shows the counters
rising, both ranks and every objective's loss; `vlm report` charts the run afterwards."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.shardgen import TINY_MODEL, set_args, write_shards
from vlm.observe.monitor import Prometheus

pytestmark = pytest.mark.e2e
VLM = str(Path(sys.executable).parent / "vlm")
REPO = Path(__file__).resolve().parents[2]
RUN = "mon-e2e"
OBJECTIVES = ["clip_infonce", "siglip"]
TINY = [*TINY_MODEL, "train.micro_batch_size=8", "train.log_every=10", "train.steps=200",
        "train.checkpoint_every=1000",
        "metrics.port=0", f"name={RUN}", "objectives=[{name: clip_infonce}, {name: siglip, weight: 0.5}]"]


def by_rank(prom: Prometheus, expr: str) -> dict[str, float]:
    return {r["metric"].get("rank"): float(r["value"][1]) for r in prom.query(expr)}


def wait_for(what: str, check, proc: subprocess.Popen, timeout: float):
    """Polls check() until it returns something truthy, the run ends, or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"training ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def test_prometheus_scrapes_a_two_worker_run(tmp_path):
    write_shards(tmp_path / "shards" / "train", n=240, per_shard=60)
    write_shards(tmp_path / "shards" / "heldout", n=16, per_shard=16, split="heldout")
    with Prometheus(tmp_path, port=0, scrape_interval="1s") as prom:
        assert prom.url.startswith("http://127.0.0.1:")
        rules = prom.api("rules")["groups"]
        assert any(r["name"] == "VlmTrainingStalled" for g in rules for r in g["rules"])
        proc = subprocess.Popen([VLM, "train", "--config", "configs/demo.yaml", "--set", f"run_dir={tmp_path}",
                                 *set_args(*TINY)], cwd=REPO, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            steps = f'vlm_train_steps_total{{run="{RUN}"}}'

            def both_ranks_stepping():
                seen = by_rank(prom, steps)
                return seen if set(seen) == {"0", "1"} and min(seen.values()) >= 1 else None

            first = wait_for("both ranks stepping", both_ranks_stepping, proc, 240)
            wait_for("the step counters to rise", lambda: all(v > first[k] for k, v in by_rank(prom, steps).items()),
                     proc, 60)
            up = by_rank(prom, f'up{{run="{RUN}"}}')
            assert up == {"0": 1.0, "1": 1.0}
            samples = by_rank(prom, f'rate(vlm_train_samples_total{{run="{RUN}"}}[5s])')
            assert set(samples) == {"0", "1"} and all(v > 0 for v in samples.values())
            for objective in [*OBJECTIVES, "total"]:
                loss = by_rank(prom, f'vlm_train_loss{{run="{RUN}",objective="{objective}"}}')
                assert set(loss) == {"0", "1"} and all(v > 0 for v in loss.values()), (objective, loss)
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not list((tmp_path / "metrics" / "targets").glob("*.json"))  # clean exits withdraw their targets

    report = subprocess.run([VLM, "report", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report.png").stat().st_size > 10_000 and "loss" in (tmp_path / "report.html").read_text()
