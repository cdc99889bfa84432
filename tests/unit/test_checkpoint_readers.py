"""Every command that reads a checkpoint follows `vlm train --resume`'s rule
(resolve_verified): the files are checked against the manifest; a run whose
newest checkpoint is torn falls back to the previous complete one with a warning on stderr
that names the bad file and the checkpoint used instead; a checkpoint named explicitly
(its directory, or --tag) that is torn is refused (exit 1), naming the file, never
replaced by another.

One real run (the real Trainer, DeepSpeed on gloo, one CPU process, ZeRO-0, CLIP + caption
decoder): 2 steps, a checkpoint after each. A copy gets its newest model-states file
truncated, its manifest kept."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.shardgen import TINY_MODEL, set_args
from test_ckpt_cli import vlm
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
OLD, NEW = "step_00000001", "step_00000002"
TORN = "mp_rank_00_model_states.pt"
BAD = f"{NEW} is corrupt: {TORN} does not match its manifest"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """base/run: the whole run; base/torn: a copy whose newest checkpoint is truncated."""
    from support.shardgen import write_shards
    from vlm.data.tokenizer import ensure_tokenizer

    base = tmp_path_factory.mktemp("readers")
    write_shards(base / "shards", n=16, per_shard=16)
    write_shards(base / "heldout", n=8, per_shard=8, split="heldout")
    run = base / "run"
    run.mkdir()
    ensure_tokenizer(str(base / "shards"), run / "tokenizer.json", vocab_size=300, min_frequency=1)
    sets = set_args(*TINY_MODEL, f"run_dir={run}", f"data.train_shards={base}/shards",
                    f"data.eval_shards={base}/heldout", "model.decoder.depth=1", "model.decoder.heads=2",
                    "objectives=[{name: clip_infonce}, {name: itg}]", "train.micro_batch_size=4", "train.steps=2",
                    "train.checkpoint_every=1", "train.keep_checkpoints=0", "train.zero_stage=0",
                    "train.num_workers=1", "train.precision=fp32", "optim.warmup_steps=1", "metrics.enabled=false",
                    "eval.every_steps=0")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "vlm.train.trainer", "--config", str(REPO / "configs" / "demo.yaml"),
                           *sets], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (run / "checkpoints" / "latest").read_text() == NEW
    torn = base / "torn"
    shutil.copytree(run, torn)
    victim = torn / "checkpoints" / NEW / TORN
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return base


def fell_back(err: str, torn: Path) -> bool:
    """The warning names the bad file and the checkpoint used instead, once each."""
    return (err.count(BAD) == 1 and "trying the previous checkpoint" in err
            and err.count(f"using the previous complete checkpoint {torn / 'checkpoints' / OLD}") == 1)


def refused(rc: int, err: str) -> bool:
    return rc == 1 and BAD in err and "Traceback" not in err and "previous" not in err


def test_eval_falls_back_and_refuses_the_named_torn_checkpoint(runs, capsys, tmp_path):
    import torch

    from vlm.eval.load import load_eval_model

    torn = runs / "torn"
    capsys.readouterr()
    model, _, _ = load_eval_model(str(torn))
    assert fell_back(capsys.readouterr().err, torn)
    whole, _, _ = load_eval_model(str(runs / "run" / "checkpoints" / OLD))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), whole.state_dict().values()))

    report = tmp_path / "eval.json"
    rc, out, err = vlm(capsys, "eval", "--checkpoint", torn, "--data", runs / "heldout", "--task", "zeroshot",
                       "--output", report)
    assert rc == 0 and fell_back(err, torn) and "zero" in out.lower()
    assert json.loads(report.read_text())["checkpoint"] == str(torn / "checkpoints" / OLD)  # the one used
    rc, _, err = vlm(capsys, "eval", "--checkpoint", torn / "checkpoints" / NEW, "--data", runs / "heldout")
    assert refused(rc, err)


@pytest.mark.parametrize("command", ["caption", "eval-generative"])
def test_caption_and_eval_generative_fall_back_and_refuse(runs, capsys, command):
    torn = runs / "torn"
    rc, out, err = vlm(capsys, command, "--checkpoint", torn, "--data", runs / "heldout", "--limit", "2",
                       *(["--task", "caption"] if command == "eval-generative" else []))
    assert rc == 0 and fell_back(err, torn), err[-3000:]
    assert out.startswith(f"checkpoint {torn / 'checkpoints' / OLD} on ")  # the one used, not the run
    rc, _, err = vlm(capsys, command, "--checkpoint", torn / "checkpoints" / NEW, "--data", runs / "heldout")
    assert refused(rc, err)


def test_ckpt_export_falls_back_and_refuses(runs, capsys, tmp_path):
    torn, out = runs / "torn", tmp_path / "m.safetensors"
    rc, stdout, err = vlm(capsys, "ckpt", "export", torn, "--output", out)
    assert rc == 0 and fell_back(err, torn) and f"exported {torn / 'checkpoints' / OLD} (step 1" in stdout
    out.unlink()
    for argv in ([torn / "checkpoints" / NEW], [torn, "--tag", NEW]):
        rc, _, err = vlm(capsys, "ckpt", "export", *argv, "--output", out)
        assert refused(rc, err) and not out.exists()


def test_data_score_falls_back_and_refuses(runs, capsys, tmp_path):
    """The driver checks once and hands the actors the checkpoint it chose; they load that
    one (here called in-process: the actors' code, without starting Ray)."""
    import torch
    from PIL import Image

    from vlm.eval.clip_score import CheckpointClipScorer
    from vlm.data.batches import decode_image
    from vlm.eval.load import load_eval_model

    torn = runs / "torn"
    capsys.readouterr()
    scorer = CheckpointClipScorer.resolved(str(torn))
    assert fell_back(capsys.readouterr().err, torn)
    assert scorer.path == str((torn / "checkpoints" / OLD).absolute())
    jpg = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(jpg, "JPEG")
    samples = [{"jpg": jpg.getvalue(), "txt": "a red square"}]
    score = scorer(samples)
    assert "warning" not in capsys.readouterr().err  # the actor does not check (or warn) again
    model, text, _ = load_eval_model(str(runs / "run" / "checkpoints" / OLD))
    with torch.no_grad():
        want = (model.encode_image(decode_image(samples[0], 32)[None]) * model.encode_text(*text(["a red square"])))
    assert score == pytest.approx(want.sum(-1).tolist(), abs=1e-5)

    rc, _, err = vlm(capsys, "data", "score", runs / "heldout", "--checkpoint", torn / "checkpoints" / NEW,
                     "--output", tmp_path / "scores", "--no-progress")
    assert refused(rc, err) and not (tmp_path / "scores").exists()


def test_train_resume_keeps_its_behaviour(runs):
    """locate (vlm train --resume) still falls back the same way, through its own warn."""
    from vlm.checkpoint.resolve import locate

    warnings: list[str] = []
    torn = runs / "torn"
    got = locate("latest", str(torn / "checkpoints"), cache=None, warn=warnings.append)
    assert got == torn / "checkpoints" / OLD and len(warnings) == 1 and BAD in warnings[0]
