"""Pre-flight checks of a training run (cluster/preflight.py): a bad global batch, a resume
with nothing to resume, a resume whose config changed keys the checkpoint fixes, an
unwritable run directory are refused with exit status 2, naming the key or file, before
Ray starts; the engine refuses a changed config on resume by itself too. And `vlm cluster
submit --name N`: N decides the run directory and the metrics' run label, and a name
submitted again with a changed config is refused, naming the keys."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cluster.cli.main import main
from vlm.data.tokenizer import prepare_tokenizer
from cluster.ray.jobs import JOB_CONFIG, check_resubmission, resolve_submission, stage as stage_job
from cluster.preflight import check_train
from support.shardgen import write_shards
from vlm.config import ConfigError, RunConfig, _models_in, load_config
from vlm.config_changes import RESUME_CHANGEABLE
from support.engine import engine
from support.ports import free_port

FAST_S = 60  # a refusal before Ray: well under what starting Ray and a worker group takes


def write_config(path: Path, run_dir: Path, shards: Path) -> Path:
    """A tiny one-worker run: the `tiny` model preset, 2 steps, a checkpoint at the end."""
    path.write_text(yaml.safe_dump({
        "name": "demo", "run_dir": str(run_dir),
        "data": {"train_shards": str(shards), "eval_shards": str(shards)},
        "model": {"preset": "tiny"}, "tokenizer": {"vocab_size": 300},
        "train": {"num_workers": 1, "micro_batch_size": 8, "steps": 2, "checkpoint_every": 2, "log_every": 1},
        "metrics": {"enabled": False}, "eval": {"every_steps": 0},
    }))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus") / "train"
    write_shards(d, n=48, per_shard=48)
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards) -> Path:
    """The config file of a run with a real checkpoint (step 2) and its config.yaml."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "run.yaml", root / "runs" / "demo", shards)
    prepare_tokenizer(load_config(config))
    out = engine(config)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (root / "runs" / "demo" / "checkpoints" / "latest").read_text() == "step_00000002"
    return config


@pytest.fixture
def fresh(tmp_path, shards) -> Path:
    return write_config(tmp_path / "run.yaml", tmp_path / "runs" / "demo", shards)


def vlm_before_ray(capsys, *argv: str) -> tuple[int, str]:
    """`vlm ARGV` in this process: (exit status, stderr); Ray must not have been started."""
    t0 = time.monotonic()
    code = main(list(argv))
    elapsed = time.monotonic() - t0
    import ray

    assert not ray.is_initialized(), "Ray was started"
    assert elapsed < FAST_S, f"took {elapsed:.0f}s"
    return code, capsys.readouterr().err


def test_global_batch_not_a_multiple_of_micro_batch_times_workers(capsys, fresh):
    code, err = vlm_before_ray(capsys, "train", "--config", str(fresh), "--set", "train.num_workers=2",
                               "--set", "train.global_batch_size=20")
    assert code == 2, err
    assert ("train.global_batch_size 20 is not a multiple of train.micro_batch_size × train.num_workers "
            "= 8 × 2 = 16") in err
    assert not (fresh.parent / "runs" / "demo" / "tokenizer.json").exists()  # refused before anything ran


def test_submit_refuses_a_bad_global_batch_before_it_contacts_the_cluster(capsys, fresh):
    code, err = vlm_before_ray(capsys, "cluster", "submit", "--address", f"http://127.0.0.1:{free_port()}",
                               "--config", str(fresh), "--set", "train.num_workers=2",
                               "--set", "train.global_batch_size=20")
    assert code == 2 and "train.global_batch_size 20" in err, err


@pytest.mark.parametrize("resume", ["latest", "step_00000007"])
def test_resume_with_nothing_to_resume_names_the_checkpoint_directory(capsys, fresh, resume):
    code, err = vlm_before_ray(capsys, "train", "--config", str(fresh), "--resume", resume)
    ckpt_dir = fresh.parent / "runs" / "demo" / "checkpoints"
    assert code == 2, err
    assert f"--resume {resume}: nothing to resume in train.checkpoint_dir {ckpt_dir}" in err


def test_resume_of_a_missing_tag_beside_a_real_checkpoint(capsys, trained):
    code, err = vlm_before_ray(capsys, "train", "--config", str(trained), "--resume", "step_00000099")
    assert code == 2 and "checkpoints/step_00000099 is incomplete or missing" in err, err


def test_fresh_run_over_existing_checkpoints_is_refused(capsys, trained):
    code, err = vlm_before_ray(capsys, "train", "--config", str(trained))
    assert code == 2 and "already has checkpoints" in err and "--resume latest" in err, err


def test_resume_with_another_model_preset_lists_the_changed_keys(capsys, trained):
    code, err = vlm_before_ray(capsys, "train", "--config", str(trained), "--resume", "latest",
                               "--set", "model.preset=demo", "--set", "train.steps=4")
    assert code == 2, err
    assert "config differs from the checkpoint" in err and "step_00000002" in err
    assert "model.preset: 'tiny' → 'demo'" in err
    assert "model.embed_dim: 16 → 64" in err and "model.vision.width: 32 → 128" in err
    assert "train.steps" not in err.split("only these may change")[0]  # allowed: not listed as a change


def test_cluster_run_checks_the_checkpoint_before_ray(capsys, trained, monkeypatch):
    # an address nobody serves: were the check missing, ray.init would fail instead (exit 1)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    code, err = vlm_before_ray(capsys, "cluster", "run", "--config", str(trained), "--set", "model.preset=demo")
    assert code == 2 and "model.preset: 'tiny' → 'demo'" in err, err


def test_resume_allows_the_changeable_keys_and_refuses_the_rest(trained):
    allowed = ["train.steps=10", "train.num_workers=2", "train.checkpoint_every=5", "optim.warmup_steps=1",
               "optim.min_lr_ratio=0.1", "eval.every_steps=5", "metrics.enabled=true", "metrics.port=0",
               "train.log_every=2", "train.keep_checkpoints=1"]
    ckpt = check_train(load_config(trained, allowed), "latest")
    assert ckpt is not None and ckpt.name == "step_00000002"
    for key, value, shown in (("optim.lr", "0.5", "optim.lr: 0.001 → 0.5"),
                              ("train.micro_batch_size", "4", "train.micro_batch_size: 8 → 4"),
                              ("train.seed", "3", "train.seed: 0 → 3"),
                              ("tokenizer.vocab_size", "400", "tokenizer.vocab_size: 300 → 400"),
                              ("objectives", "[{name: siglip}]", "objectives.0.name: 'clip_infonce' → 'siglip'")):
        with pytest.raises(ConfigError) as e:
            check_train(load_config(trained, [*allowed, f"{key}={value}"]), "latest")
        assert shown in str(e.value)
        assert "train.steps:" not in str(e.value)


def test_engine_refuses_a_changed_config_on_resume_by_itself(trained):
    out = engine(trained, "--set", "model.preset=demo", "--resume", "latest")
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "config differs from the checkpoint" in text and "model.preset: 'tiny' → 'demo'" in text
    assert "Traceback" not in text
    latest = trained.parent / "runs" / "demo" / "checkpoints" / "latest"
    assert latest.read_text() == "step_00000002"  # nothing trained or saved


def test_unwritable_run_dir_is_refused_naming_it(capsys, tmp_path, shards):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the run directory's parent should be")
    config = write_config(tmp_path / "run.yaml", blocker / "demo", shards)
    code, err = vlm_before_ray(capsys, "train", "--config", str(config))
    assert code == 2 and f"run_dir {blocker / 'demo'} is not writable" in err, err


def test_submit_name_decides_run_dir_and_metrics_run_label(fresh, tmp_path):
    from vlm.train.trainer import Trainer

    default, name = resolve_submission(str(fresh), [], None)
    assert name == "demo" and default.run_dir == str(fresh.parent / "runs" / "demo")
    cfg, name = resolve_submission(str(fresh), [], "t7")
    run_dir = fresh.parent / "runs" / "t7"
    assert name == "t7" and cfg.name == "t7" and cfg.run_dir == str(run_dir)
    assert cfg.path(cfg.train.checkpoint_dir) == str(run_dir / "checkpoints")
    assert cfg.data.train_shards == default.data.train_shards  # inputs are shared, outputs are not

    stage = Path(stage_job(cfg, name))
    try:
        staged = load_config(stage / JOB_CONFIG)
        assert (stage / "cluster" / "cli" / "main.py").is_file()  # the job's entrypoint travels with it
    finally:
        shutil.rmtree(stage)
    assert staged.name == "t7" and staged.run_dir == str(run_dir)
    # the engine's own exporter set-up, on the staged config: the target it announces
    staged.metrics.enabled, staged.metrics.port = True, 0
    metrics = Trainer._start_metrics(SimpleNamespace(cfg=staged, on_gpu=False, text=None, rank=0, world_size=1,
                                                     run_dir=Path(staged.run_dir)))
    try:
        target = json.loads((run_dir / "metrics" / "targets" / "rank0.json").read_text())
        assert target[0]["labels"] == {"run": "t7", "rank": "0"}
    finally:
        metrics.close()


def test_submit_name_with_a_shared_checkpoint_dir_is_refused(fresh):
    with pytest.raises(ConfigError, match=r"--name t7: train.checkpoint_dir '/tmp/shared/ckpt' does not follow"):
        resolve_submission(str(fresh), ["train.checkpoint_dir=/tmp/shared/ckpt"], "t7")


def test_resubmitting_a_name_with_another_config_is_refused_naming_the_keys(trained):
    # the run directory's config.yaml (written by the run's first start) is what it was started with
    assert (trained.parent / "runs" / "demo" / "config.yaml").is_file()
    same, name = resolve_submission(str(trained), ["train.steps=9"], None)
    check_resubmission(same, name, [])  # a resume-changeable key: allowed
    changed, name = resolve_submission(str(trained), ["model.preset=demo", "train.zero_stage=1"], None)
    with pytest.raises(ConfigError) as e:
        check_resubmission(changed, name, [])
    msg = str(e.value)
    assert "run 'demo' was started with another config" in msg and "pick a new --name" in msg
    assert "model.preset: 'tiny' → 'demo'" in msg and "train.zero_stage: 2 → 1" in msg
    # a job of the name that is still running or succeeded: any change is one that would be ignored
    job = SimpleNamespace(status="SUCCEEDED", submission_id="vlm-demo", metadata={
        "vlm_run": "demo", "run_dir": same.run_dir, "vlm_config": json.dumps(same.model_dump(mode="json"))},
        message="")
    check_resubmission(same, name, [job])
    longer, _ = resolve_submission(str(trained), ["train.steps=20"], None)
    with pytest.raises(ConfigError, match=r"already submitted .*\n  train.steps: 9 → 20"):
        check_resubmission(longer, name, [job])


def _field_models(models, part):
    fields = [m.model_fields[part] for m in models if part in m.model_fields]
    assert fields, f"no key {part}"
    return [m for f in fields for m in _models_in(f.annotation)]


def test_every_resume_changeable_key_exists():
    for key in RESUME_CHANGEABLE:
        models = [RunConfig]
        for part in key.split("."):
            if part == "*":
                continue  # a list index: _models_in already looked through list[...]
            assert models, f"{key}: {part} is below a plain value"
            models = _field_models(models, part)
