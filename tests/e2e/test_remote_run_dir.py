"""A run whose run_dir is s3://… (moto's S3 server on 127.0.0.1), so that no node needs a
shared file system: `python -m vlm.train.trainer` (one rank, no Ray) reads its tokenizer
from the bucket and writes its config, step log, evaluation log, metrics endpoint and
checkpoints there, nothing in its working directory; a resume cuts the logs back to the
checkpoint's step and each step is logged once; `vlm report s3://…` charts it locally."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from support.ports import free_port
from support.s3 import moto_s3
from support.shardgen import TINY_MODEL, set_args, shards_with_tokenizer, write_shards
from vlm import rundir

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
BASE = [*TINY_MODEL, "train.micro_batch_size=16", "train.log_every=1", "optim.warmup_steps=1",
        "train.checkpoint_every=2", "train.keep_checkpoints=0", "train.zero_stage=2",
        "metrics.enabled=true", "metrics.port=0", "eval.every_steps=2", "eval.tasks=[zeroshot]"]


@pytest.fixture(scope="module")
def s3():
    with moto_s3("remote-runs") as (fs, env):
        yield fs, env


def train(cwd: Path, env: dict, *sets: str, resume: str | None = None, nodes: list[Path] | None = None) -> str:
    """The engine started in `cwd`: one rank, or one rank per directory of `nodes`, each
    its TMPDIR (so each its own scratch directory, as on separate machines: they share
    nothing but the bucket). Their output."""
    port = free_port()
    args = [sys.executable, "-m", "vlm.train.trainer", "--config", str(REPO / "configs" / "demo.yaml"),
            *set_args(*BASE, *sets), *(["--resume", resume] if resume else [])]
    procs, logs = [], []
    for rank, node in enumerate(nodes or [None]):
        e = {**os.environ, **env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
             "WORLD_SIZE": str(len(nodes or [None])), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
             "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
             **({"TMPDIR": str(node)} if node else {})}
        logs.append(tempfile.TemporaryFile("w+"))  # not a pipe: a rank blocked on a full one would stall both
        procs.append(subprocess.Popen(args, cwd=cwd, env=e, stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for f in logs:
        f.seek(0)
    out = "\n".join(f.read() for f in logs)
    assert all(p.returncode == 0 for p in procs), out[-6000:]
    return out


def steps(url: str) -> list[int]:
    return [json.loads(line)["step"] for line in rundir.read_text(url).splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(training shards, held-out shards, the tokenizer)."""
    root, shards, tok = shards_with_tokenizer(tmp_path_factory.mktemp("remote"), n=128, per_shard=64)
    write_shards(root / "heldout", n=32, per_shard=32, split="heldout")
    return shards, root / "heldout", tok


def new_run(data, tmp_path: Path) -> tuple[str, Path, tuple[str, ...]]:
    """A run URL holding only the tokenizer, an empty working directory, the run's --set values."""
    shards, heldout, tok = data
    url = f"s3://remote-runs/{uuid.uuid4().hex[:8]}"
    rundir.write_text(f"{url}/tokenizer.json", tok.read_text())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return url, cwd, (f"run_dir={url}", f"data.train_shards={shards}", f"data.eval_shards={heldout}")


def test_a_run_on_s3_trains_resumes_and_reports_without_local_files(s3, data, tmp_path):
    fs, env = s3
    url, cwd, sets = new_run(data, tmp_path)
    try:
        out = train(cwd, env, *sets, "train.steps=4")
        assert f"checkpoint {url}/checkpoints/step_00000004" in out
        assert list(cwd.iterdir()) == []  # nothing in the working directory
        assert "name: demo" in rundir.read_text(f"{url}/config.yaml")
        assert rundir.read_text(f"{url}/checkpoints/latest") == "step_00000004"
        assert json.loads(rundir.read_text(f"{url}/metrics/rank0.json"))["url"].startswith("http://127.0.0.1:")
        assert steps(f"{url}/train_log.jsonl") == [1, 2, 3, 4]
        assert steps(f"{url}/eval_log.jsonl") == [2, 4]
        # as if the run had died after logging step 4 but before its checkpoint: it resumes at 2
        rundir.write_text(f"{url}/checkpoints/latest", "step_00000002")
        fs.rm(f"{url}/checkpoints/step_00000004", recursive=True)
        out = train(cwd, env, *sets, "train.steps=5", resume="latest")
        assert "at step 2" in out, out[-3000:]
        assert list(cwd.iterdir()) == []
        assert steps(f"{url}/train_log.jsonl") == [1, 2, 3, 4, 5]
        assert steps(f"{url}/eval_log.jsonl") == [2, 4, 5]
        assert rundir.read_text(f"{url}/checkpoints/latest") == "step_00000005"
        assert not list((rundir.scratch_dir(url) / ".ckpt_staging").rglob("*.pt"))  # uploaded and removed

        from cluster.cli.main import main

        assert main(["report", url, "--output", str(tmp_path / "report")]) == 0
        page = (tmp_path / "report" / "report.html").read_text()
        assert "5 steps logged" in page and "zeroshot/acc1" in page
    finally:
        shutil.rmtree(rundir.scratch_dir(url), ignore_errors=True)


def test_two_nodes_share_nothing_but_the_bucket(s3, data, tmp_path):
    fs, env = s3
    url, cwd, sets = new_run(data, tmp_path)
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    train(cwd, env, *sets, "train.steps=2", "eval.every_steps=0", nodes=nodes)
    manifest = json.loads(rundir.read_text(f"{url}/checkpoints/step_00000002/manifest.json"))
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(manifest["files"])
    out = train(cwd, env, *sets, "train.steps=3", "eval.every_steps=0", resume="latest", nodes=nodes)
    assert "at step 2" in out, out[-3000:]
    assert steps(f"{url}/train_log.jsonl") == [1, 2, 3]
    assert list(cwd.iterdir()) == []
    for node in nodes:  # each node downloaded the checkpoint into its own scratch directory
        scratch = node / rundir.SCRATCH_ROOT / rundir.scratch_dir(url).name
        assert (scratch / ".ckpt_cache" / "step_00000002" / "manifest.json").is_file()
