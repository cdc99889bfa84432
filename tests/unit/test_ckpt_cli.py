"""`vlm ckpt list|inspect|export` and `vlm eval` on exports, against real checkpoints:
the real Trainer (DeepSpeed, gloo, CPU) runs 3 steps under each ZeRO stage 0-3 on two
processes, and dumps its module's weights (ZeRO-3: gathered) for comparison.

Run as a script (`python tests/unit/test_ckpt_cli.py BASE STAGE...`, with RANK/WORLD_SIZE/
MASTER_PORT set), this file is the training side of the fixture."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
MICRO = 4
STAGES = (0, 1, 2, 3)
RANKS = 2  # training processes: the optimizer state (ZeRO 1-3) and the weights (3) are split in two
ENGINE_WEIGHTS = "engine_weights.pt"


def train_stages(base: Path, stages: list[int]) -> None:
    """Trains one run per ZeRO stage in this process (one rank of WORLD_SIZE), then saves
    the live module's weights: what the export must reproduce."""
    sys.path.insert(0, str(REPO / "tests"))
    import deepspeed
    from support.shardgen import TINY_MODEL

    from vlm.config import load_config
    from vlm.train.trainer import Trainer

    for stage in stages:
        run = base / f"z{stage}"
        cfg = load_config(REPO / "configs" / "demo.yaml", [
            *TINY_MODEL, f"run_dir={run}", f"data.train_shards={base}/shards", f"data.eval_shards={base}/heldout",
            f"train.micro_batch_size={MICRO}", f"train.steps={STEPS}", "train.checkpoint_every=2",
            "train.keep_checkpoints=0", f"train.zero_stage={stage}", f"train.num_workers={RANKS}",
            "train.precision=fp32", "optim.warmup_steps=1", "metrics.enabled=false", "eval.every_steps=0"])
        trainer = Trainer(cfg)
        trainer.run()
        module = trainer.engine.module
        params = list(module.parameters()) if stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if trainer.rank == 0:
            torch.save(weights, run / ENGINE_WEIGHTS)


def _launch(base: Path, stages: list[int], world_size: int) -> None:
    from support.ports import free_port  # here: run as a script, this file has no tests/ on its path yet

    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, __file__, str(base), *map(str, stages)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from support.shardgen import write_shards

    from vlm.data.tokenizer import ensure_tokenizer

    base = tmp_path_factory.mktemp("ckpt")
    write_shards(base / "shards", n=64, per_shard=16)
    write_shards(base / "heldout", n=24, per_shard=24, split="heldout")
    ensure_tokenizer(str(base / "shards"), base / "tokenizer.json", vocab_size=300, min_frequency=1)
    for stage in STAGES:
        (base / f"z{stage}").mkdir()
        shutil.copy(base / "tokenizer.json", base / f"z{stage}" / "tokenizer.json")
    _launch(base, list(STAGES), RANKS)
    return base


def vlm(capsys, *argv) -> tuple[int, str, str]:
    from cluster.cli.main import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def tags(run: Path) -> Path:
    return run / "checkpoints"


@pytest.mark.parametrize("argv", [["ckpt"], ["ckpt", "list"], ["ckpt", "inspect"], ["ckpt", "export"]], ids=" ".join)
def test_help(argv, capsys):
    from cluster.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0 and f"usage: vlm {' '.join(argv)}" in capsys.readouterr().out


def test_list_shows_every_tag_with_validity(runs, tmp_path, capsys):
    rc, out, _ = vlm(capsys, "ckpt", "list", runs / "z3")
    assert rc == 0 and "step_00000003 *" in out and out.count(" ok") == 2
    run = tmp_path / "run"
    shutil.copytree(runs / "z0", run)
    bad = tags(run) / "step_00000002" / "mp_rank_00_model_states.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum sees it
    bad.write_bytes(bytes(data))
    unfinished = tags(run) / "step_00000004"
    shutil.copytree(tags(run) / "step_00000003", unfinished)
    (unfinished / "manifest.json").unlink()

    rc, out, _ = vlm(capsys, "ckpt", "list", run, "--json")
    rows = {r["tag"]: r for r in json.loads(out)}
    assert rc == 1 and list(rows) == ["step_00000004", "step_00000003", "step_00000002"]
    assert rows["step_00000004"]["status"] == "incomplete" and "no manifest.json" in rows["step_00000004"]["problem"]
    assert rows["step_00000003"]["status"] == "ok" and rows["step_00000003"]["latest"]
    assert rows["step_00000002"]["status"] == "corrupt"
    assert rows["step_00000002"]["problem"] == "mp_rank_00_model_states.pt does not match its manifest"
    for tag, r in rows.items():
        assert r["step"] == (3 if tag == "step_00000004" else int(tag[5:]))  # 4 is a copy of 3
        assert r["samples_seen"] == r["step"] * MICRO * RANKS and r["world_size"] == RANKS
        assert r["bytes"] == sum(p.stat().st_size for p in (tags(run) / tag).iterdir())
    rc, out, _ = vlm(capsys, "ckpt", "list", run)
    assert "step_00000003 *" in out and "corrupt: mp_rank_00_model_states.pt does not match its manifest" in out
    rc, out, _ = vlm(capsys, "ckpt", "list", run, "--json", "--no-verify")  # sizes only: the flip goes unseen
    assert {r["tag"]: r["status"] for r in json.loads(out)}["step_00000002"] == "ok"
    rc, _, err = vlm(capsys, "ckpt", "list", tmp_path / "nowhere")
    assert rc == 1 and "run directory not found" in err
    rc, _, err = vlm(capsys, "ckpt", "list", runs / "shards")
    assert rc == 1 and "has no checkpoints/ directory" in err


def test_inspect_reports_stage_parameters_files_and_manifest(runs, tmp_path, capsys):
    rc, out, _ = vlm(capsys, "ckpt", "inspect", runs / "z3", "--json")
    info = json.loads(out)
    ckpt = tags(runs / "z3") / "step_00000003"
    assert rc == 0 and info["path"] == str(ckpt) and info["status"] == "ok"
    assert (info["step"], info["samples_seen"], info["world_size"], info["zero_stage"]) == \
        (3, 3 * RANKS * MICRO, RANKS, 3)
    engine = torch.load(runs / "z3" / ENGINE_WEIGHTS)
    assert info["model"]["parameters"] == sum(v.numel() for v in engine.values())
    assert info["model"]["model_parameters"] == sum(v.numel() for k, v in engine.items() if k.startswith("model."))
    assert info["model"]["by_component"]["objective 0 (clip_infonce)"] == 1  # the temperature
    assert info["objectives"] == [{"name": "clip_infonce", "weight": 1.0}]
    assert info["files"] == {p.name: p.stat().st_size for p in ckpt.iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(info["files"])
    rc, out, _ = vlm(capsys, "ckpt", "inspect", runs / "z0", "--tag", "step_00000002")
    assert rc == 0 and "ZeRO-0" in out and "manifest    ok" in out and "mp_rank_00_model_states.pt" in out

    copy = tmp_path / "step_00000003"
    shutil.copytree(ckpt, copy)
    with open(copy / "trainer_state.pt", "ab") as f:
        f.write(b"x")
    rc, out, _ = vlm(capsys, "ckpt", "inspect", copy, "--json")
    assert rc == 1 and json.loads(out)["problem"] == "trainer_state.pt does not match its manifest"
    rc, _, err = vlm(capsys, "ckpt", "inspect", runs / "z3", "--tag", "step_00000099")
    assert rc == 1 and "no checkpoint step_00000099" in err


@pytest.mark.parametrize("stage", STAGES)
def test_export_equals_the_engine_weights(runs, tmp_path, capsys, stage):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from vlm.checkpoint.safeload import load_trainer_state

    out = tmp_path / "model.safetensors"
    rc, stdout, err = vlm(capsys, "ckpt", "export", runs / f"z{stage}", "--output", out)
    assert rc == 0, err
    assert f"ZeRO-{stage}" in stdout and not list(tmp_path.glob(".*tmp"))
    exported = load_file(str(out))
    engine = torch.load(runs / f"z{stage}" / ENGINE_WEIGHTS)
    expected = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in engine.items()}
    assert set(exported) == set(expected)
    for k, v in expected.items():
        assert exported[k].dtype == torch.float32 and torch.equal(exported[k], v), k
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    state = load_trainer_state(tags(runs / f"z{stage}") / "step_00000003")
    assert json.loads(meta["vlm_config"]) == state["config"]
    assert meta["vlm_tokenizer"] == (runs / f"z{stage}" / "tokenizer.json").read_text()
    assert meta["vlm_step"] == "3" and json.loads(meta["vlm_objectives"]) == ["clip_infonce"]


@pytest.mark.parametrize("stage", [0, 3])
def test_eval_loads_the_export_like_the_checkpoint(runs, tmp_path, capsys, stage):
    from vlm.eval.load import load_eval_model

    out = tmp_path / "model.safetensors"
    assert vlm(capsys, "ckpt", "export", runs / f"z{stage}", "--output", out)[0] == 0
    from_ckpt, text, _ = load_eval_model(str(runs / f"z{stage}"))
    from_export, text2, cfg = load_eval_model(str(out))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens, eot = text(["a red circle", "a blue square on a plain background", "green"])
    with torch.no_grad():
        assert torch.equal(from_ckpt.encode_image(images), from_export.encode_image(images))
        assert torch.equal(from_ckpt.encode_text(tokens, eot), from_export.encode_text(*text2(
            ["a red circle", "a blue square on a plain background", "green"])))
    assert cfg.train.zero_stage == stage
    if stage != 3:
        return
    results = []
    for source in (runs / "z3", out):
        rc, _, err = vlm(capsys, "eval", "--checkpoint", source, "--data", runs / "heldout", "--task", "zeroshot",
                         "--task", "retrieval", "--output", tmp_path / "eval.json")
        assert rc == 0, err
        results.append(json.loads((tmp_path / "eval.json").read_text()))
    assert results[0]["num_images"] == 24
    for task in ("zeroshot", "retrieval"):
        assert results[0][task] == results[1][task]


def test_export_errors_are_clear(runs, tmp_path, capsys):
    from safetensors.torch import save_file

    from vlm.eval.load import load_eval_model

    out = tmp_path / "m.safetensors"
    rc, _, err = vlm(capsys, "ckpt", "export", tmp_path / "missing", "--output", out)
    assert rc == 1 and "checkpoint or run directory not found" in err
    rc, _, err = vlm(capsys, "ckpt", "export", runs / "z0", "--output", tmp_path / "m.pt")
    assert rc == 1 and "must be a .safetensors file" in err

    run = tmp_path / "run"
    shutil.copytree(runs / "z1", run)
    unfinished = tags(run) / "step_00000003"
    (unfinished / "manifest.json").unlink()
    rc, _, err = vlm(capsys, "ckpt", "export", unfinished, "--output", out)
    assert rc == 1 and "is incomplete: no manifest.json" in err
    with open(tags(run) / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "ab") as f:
        f.write(b"x")
    rc, _, err = vlm(capsys, "ckpt", "export", run, "--tag", "step_00000002", "--output", out)
    assert rc == 1 and "corrupt: zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its manifest" in err
    rc, _, err = vlm(capsys, "ckpt", "export", run, "--output", out)  # latest is unfinished, the rest corrupt
    assert rc == 1 and "no complete checkpoint" in err and not out.exists()

    run = tmp_path / "run0"
    shutil.copytree(runs / "z0", run)
    with open(tags(run) / "step_00000003" / "trainer_state.pt", "ab") as f:
        f.write(b"x")
    rc, stdout, err = vlm(capsys, "ckpt", "export", run, "--output", out)  # a corrupt latest: the previous one
    assert rc == 0 and "step_00000003 is corrupt: trainer_state.pt does not match its manifest" in err
    assert "(step 2, ZeRO-0)" in stdout
    rc, _, err = vlm(capsys, "ckpt", "export", runs / "z0", "--output", out)
    assert rc == 1 and "exists: pass --force" in err
    assert vlm(capsys, "ckpt", "export", runs / "z0", "--output", out, "--force")[0] == 0
    (unfinished / "trainer_state.pt").unlink()
    rc, out_text, _ = vlm(capsys, "ckpt", "inspect", unfinished, "--json")  # DeepSpeed's files only
    assert rc == 1 and json.loads(out_text)["status"] == "incomplete"

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="is not a vlm export"):
        load_eval_model(str(plain))
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(out.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_eval_model(str(torn))


if __name__ == "__main__":
    train_stages(Path(sys.argv[1]), [int(s) for s in sys.argv[2:]])
