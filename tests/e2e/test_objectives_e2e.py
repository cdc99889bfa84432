"""`vlm train` with each contrastive objective alone and with a weighted mix, on the demo
corpus (labels from its metadata, two augmented views for the image–image objective), on
2 Ray Train workers joined to one Ray head started on 127.0.0.1 for the module."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.rayhead import ray_head as start_head
from support.shardgen import TINY_MODEL, set_args, write_shards
from vlm.checkpoint.resolve import resolve
from vlm.checkpoint.safeload import load_trainer_state

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
TINY = [*TINY_MODEL, "train.micro_batch_size=6", "train.log_every=1", "train.steps=3", "metrics.port=0"]


@pytest.fixture(scope="module")
def ray_head():
    with start_head(dict(os.environ)) as h:
        yield h.address


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_shards(d / "train", n=120, per_shard=30)
    return d / "train"


RUNS = {
    "clip_infonce": ["objectives=[{name: clip_infonce}]"],
    "siglip": ["objectives=[{name: siglip}]"],
    "slip_image": ["objectives=[{name: slip_image, head_hidden: 32, head_dim: 16}]"],
    "unicl": ["objectives=[{name: unicl}]"],
    "mix": ["objectives=[{name: clip_infonce, weight: 1.0}, "
            "{name: slip_image, weight: 0.5, head_hidden: 32, head_dim: 16}, {name: unicl, weight: 0.5}]"],
}


@pytest.mark.parametrize("which", list(RUNS))
def test_train_runs_objective(which, ray_head, shards, tmp_path):
    run_dir = tmp_path / which
    args = [str(BIN / "vlm"), "train", "--config", "configs/demo.yaml", "--ray-address", ray_head,
            "--set", f"run_dir={run_dir}", "--set", f"data.train_shards={shards}", "--set", f"name={which}"]
    args += set_args(*TINY, *RUNS[which])
    # An in-process ray.init elsewhere in the session sets RAY_AUTH_MODE for this process;
    # drop it so joining the head works (or fails) as it does for a user's shell.
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    names = [o.split("name: ")[1].split(",")[0].rstrip("}]") for o in RUNS[which][0].split("{")[1:]]
    for rec in log:
        for name in names:  # each objective is logged on its own
            assert rec[f"loss/{name}"] > 0
    if which == "mix":  # the total is the weighted sum
        rec = log[-1]
        expected = rec["loss/clip_infonce"] + 0.5 * rec["loss/slip_image"] + 0.5 * rec["loss/unicl"]
        assert rec["loss/total"] == pytest.approx(expected, rel=1e-5)
    state = load_trainer_state(resolve(str(run_dir)))
    assert state["step"] == 3
