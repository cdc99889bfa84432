"""A checkpoint directory is untrusted input (DESIGN.md, "Trust boundaries"): whoever can
write it (a shared volume, a bucket) can rewrite its manifest too. So no checkpoint file is
ever unpickled with arbitrary globals, and no name read from a manifest or a `latest`
file leaves its directory.

Real checkpoints (the real Trainer, DeepSpeed on gloo, 2 processes, ZeRO 0, 2 and 3, as
tests/unit/test_ckpt_cli.py makes them, plus DeepSpeed's universal conversion of the ZeRO-2
one) get a payload planted in one file, the manifest recomputed: an object whose
unpickling would create a marker file. Every command that reads checkpoints must refuse
it (exit 1, naming the file and the global) and the marker must never appear."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch

from support.shardgen import TINY_MODEL, set_args
from test_ckpt_cli import MICRO, RANKS, _launch, vlm
from vlm.checkpoint.discover import complete_tags
from vlm.checkpoint.layout import UnsafeCheckpointError
from vlm.checkpoint.resolve import fetch_remote, resolve
from vlm.checkpoint.rng import set_rng_state
from vlm.checkpoint.safeload import check_files, load, load_trainer_state, weights_only_loads
from vlm.checkpoint.verify import verify, write_manifest
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
TAG = "step_00000003"
UNIVERSAL_PARAM = "model.text.pos_embed"


class Payload:
    """Unpickling it calls open(marker, "w"): the file appears iff the object was built."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """z0, z2, z3: 3 steps on 2 ranks (checkpoints at steps 2 and 3), and z2's newest
    converted to the universal format where a resume at another world size caches it."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from support.shardgen import write_shards
    from vlm.data.tokenizer import ensure_tokenizer

    base = tmp_path_factory.mktemp("trust")
    write_shards(base / "shards", n=64, per_shard=16)
    write_shards(base / "heldout", n=24, per_shard=24, split="heldout")
    ensure_tokenizer(str(base / "shards"), base / "tokenizer.json", vocab_size=300, min_frequency=1)
    stages = [0, 2, 3]
    for stage in stages:
        (base / f"z{stage}").mkdir()
        shutil.copy(base / "tokenizer.json", base / f"z{stage}" / "tokenizer.json")
    _launch(base, stages, RANKS)
    out = base / "z2" / ".universal" / TAG
    ds_to_universal(Namespace(input_folder=str(base / "z2" / "checkpoints" / TAG), output_folder=str(out),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False))
    return base


# file kind -> (run, path inside the run)
KINDS = {
    "trainer_state": ("z0", f"checkpoints/{TAG}/trainer_state.pt"),
    "model_states": ("z0", f"checkpoints/{TAG}/mp_rank_00_model_states.pt"),
    "zero3_model_states": ("z3", f"checkpoints/{TAG}/zero_pp_rank_0_mp_rank_00_model_states.pt"),
    "optim_states": ("z2", f"checkpoints/{TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "universal_model_states": ("z2", f".universal/{TAG}/mp_rank_00_model_states.pt"),
    "universal_param": ("z2", f".universal/{TAG}/zero/{UNIVERSAL_PARAM}/fp32.pt"),
    "universal_optimizer": ("z2", f".universal/{TAG}/zero/optimizer_state.pt"),
}


def planted(runs: Path, tmp_path: Path, kind: str) -> tuple[Path, Path, Path]:
    """A copy of the kind's run with the payload in that file and the manifest recomputed
    -> (run dir, the planted file, the marker its unpickling would create)."""
    name, rel = KINDS[kind]
    run = tmp_path / name
    shutil.copytree(runs / name, run, symlinks=True)
    victim, marker = run / rel, tmp_path / "MARKER"
    state = load(victim)
    if isinstance(state, dict):
        state["extra"] = Payload(marker)
    else:
        state = [state, Payload(marker)]
    torch.save(state, victim)
    if "universal" not in kind:
        write_manifest(victim.parent, 3)
    return run, victim, marker


def refused(text: str, victim: Path, *, full_path: bool = True) -> bool:
    """Whether the message names the file and the refused global (open pickles as io.open)."""
    return (str(victim) if full_path else victim.name) in text and "io.open" in text


# -- legitimate checkpoints load, through the safe loader only --------------------------------


def test_every_file_of_real_checkpoints_loads_with_weights_only(runs):
    files = sorted(p for name in ("z0", "z2", "z3") for p in (runs / name).rglob("*.pt")
                   if p.name != "engine_weights.pt")
    assert {p.name for p in files} >= {"trainer_state.pt", "mp_rank_00_model_states.pt", "fp32.pt", "exp_avg.pt",
                                       "optimizer_state.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                       "zero_pp_rank_1_mp_rank_00_model_states.pt"}
    for p in files:
        load(p)
    for name in ("z0", "z2", "z3"):
        for ckpt in complete_tags(runs / name / "checkpoints"):
            assert resolve(str(ckpt), verify_files=True) == ckpt
    # the trainer state is plain data: not even NumPy's globals
    state_file = runs / "z0" / "checkpoints" / TAG / "trainer_state.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(state_file) == []
    rng = load(state_file)["ranks"][0]["rng"]
    assert isinstance(rng["numpy"][1], list)


def test_a_trainer_state_with_numpy_rng_arrays_still_loads(tmp_path):
    """Written before the RNG state was plain data: NumPy's array globals are allowed in
    trainer_state.pt (only there), and the state restores."""
    import numpy as np

    np.random.seed(7)
    old = {"step": 1, "ranks": [{"rng": {"python": __import__("random").getstate(), "numpy": np.random.get_state(),
                                         "torch": torch.get_rng_state(), "cuda": None}}]}
    torch.save(old, tmp_path / "trainer_state.pt")
    state = load_trainer_state(tmp_path)
    set_rng_state(state["ranks"][0]["rng"])
    expected = np.random.RandomState(7).rand(3)
    assert np.array_equal(np.random.rand(3), expected)
    shutil.copy(tmp_path / "trainer_state.pt", tmp_path / "other.pt")  # elsewhere NumPy is not allowed
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        load(tmp_path / "other.pt")


# -- the loader refuses a payload in every kind of file ---------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_loader_refuses_a_payload_in_every_kind_of_file(runs, tmp_path, kind):
    run, victim, marker = planted(runs, tmp_path, kind)
    with pytest.raises(UnsafeCheckpointError) as e:
        load(victim)
    assert refused(str(e.value), victim) and e.value.path == victim and e.value.needs == "the global io.open"
    ckpt = victim.parent if victim.parent.name == TAG else run / ".universal" / TAG
    with pytest.raises(UnsafeCheckpointError, match="io.open"):
        check_files(ckpt)
    if "universal" not in kind:  # a planted checkpoint is refused, not skipped for the previous one
        with pytest.raises(UnsafeCheckpointError, match="io.open"):
            resolve(str(run), verify_files=True, warn=pytest.fail)
    with pytest.raises(Exception), weights_only_loads():  # DeepSpeed's own load, forced
        torch.load(victim, weights_only=False)
    assert not marker.exists()


# -- every command that reads checkpoints refuses -------------------------------------------


def test_ckpt_list_shows_unsafe(runs, tmp_path, capsys):
    run, victim, marker = planted(runs, tmp_path, "optim_states")  # a file `list` never loads
    rc, out, _ = vlm(capsys, "ckpt", "list", run)
    assert not marker.exists(), "the payload ran"
    assert rc == 1 and f"{TAG} *" in out
    line = next(ln for ln in out.splitlines() if ln.startswith(TAG))
    assert "unsafe: " in line and victim.name in line and "io.open" in line and " ok" not in line
    rc, out, _ = vlm(capsys, "ckpt", "list", run, "--json", "--no-verify")
    row = {r["tag"]: r for r in json.loads(out)}[TAG]
    assert rc == 1 and row["status"] == "unsafe" and refused(row["problem"], victim, full_path=False)


@pytest.mark.parametrize("kind", ["trainer_state", "zero3_model_states"])
def test_ckpt_inspect_refuses(runs, tmp_path, capsys, kind):
    run, victim, marker = planted(runs, tmp_path, kind)
    rc, out, _ = vlm(capsys, "ckpt", "inspect", run, "--json")
    assert not marker.exists(), "the payload ran"
    info = json.loads(out)
    assert rc == 1 and info["status"] == "unsafe" and refused(info["problem"], victim, full_path=False)
    assert "step" not in info


def _data_args(runs: Path, command: str) -> list:
    return {"eval": ["--data", runs / "heldout"], "caption": ["--data", runs / "heldout"],
            "eval-generative": ["--data", runs / "heldout"]}.get(command, [])


@pytest.mark.parametrize("command,kind", [
    ("ckpt export", "optim_states"),          # zero_to_fp32 reads the optimizer shards
    ("ckpt export", "trainer_state"),
    ("eval", "model_states"),                  # ZeRO-0: the module from the model states
    ("caption", "trainer_state"),
    ("eval-generative", "zero3_model_states"),  # ZeRO-3: zero_to_fp32
    ("data score", "trainer_state"),           # read by the scoring actors
])
def test_commands_refuse_a_planted_checkpoint(runs, tmp_path, capsys, command, kind):
    run, victim, marker = planted(runs, tmp_path, kind)
    if command == "ckpt export":
        argv = ["ckpt", "export", run, "--output", tmp_path / "m.safetensors"]
    elif command == "data score":
        argv = ["data", "score", runs / "heldout", "--checkpoint", run, "--output", tmp_path / "scores",
                "--no-progress"]
    else:
        argv = [command, "--checkpoint", run, *_data_args(runs, command)]
    rc, _, err = vlm(capsys, *argv)
    assert not marker.exists(), "the payload ran"
    assert rc == 1 and refused(err, victim), err[-3000:]
    assert "Traceback" not in err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "scores").exists()


def _config(run: Path, runs: Path, *sets: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo.yaml"), *set_args(
        *TINY_MODEL, f"run_dir={run}", f"data.train_shards={runs}/shards", f"data.eval_shards={runs}/heldout",
        f"train.micro_batch_size={MICRO}", "train.steps=4", "train.precision=fp32", "metrics.enabled=false",
        "eval.every_steps=0", *sets)]


@pytest.mark.parametrize("kind", ["optim_states", "trainer_state"])
def test_train_resume_is_refused_by_the_driver_before_ray(runs, tmp_path, capsys, kind):
    run, victim, marker = planted(runs, tmp_path, kind)
    t0 = time.monotonic()
    rc, _, err = vlm(capsys, "train", *_config(run, runs, f"train.zero_stage={run.name[1:]}",
                                               f"train.num_workers={RANKS}"), "--resume", "latest")
    assert not marker.exists(), "the payload ran"
    assert rc == 1 and refused(err, victim), err[-3000:]
    assert time.monotonic() - t0 < 60 and not (run / "ray").exists()  # refused before any worker started


@pytest.mark.parametrize("kind", ["optim_states", "universal_param"])
def test_train_workers_refuse_too(runs, tmp_path, kind):
    """A worker started without the driver's check (python -m vlm.train.trainer, as torchrun
    starts it) refuses the checkpoint itself; at world size 1 the ZeRO-2 checkpoint of 2
    workers loads through the universal copy, which is checked too."""
    run, victim, marker = planted(runs, tmp_path, kind)
    if "universal" not in kind:  # no cached universal copy: the conversion reads every file
        shutil.rmtree(run / ".universal")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "vlm.train.trainer", *_config(run, runs, "train.zero_stage=2"),
                           "--resume", "latest"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert not marker.exists(), "the payload ran"
    assert proc.returncode != 0 and refused(out, victim), out[-4000:]
    assert "resumed from" not in out


# -- names from a manifest or `latest` stay inside their directory ----------------------------


def _tiny_checkpoint(ckpt: Path, step: int) -> None:
    ckpt.mkdir(parents=True)
    torch.save({"step": step, "w": torch.ones(2)}, ckpt / "trainer_state.pt")
    write_manifest(ckpt, step)


def _upload(fs, local: Path, url: str) -> None:
    for p in local.rglob("*"):
        if p.is_file():
            fs.pipe_file(f"{url}/{p.relative_to(local)}", p.read_bytes())


@pytest.fixture
def store(tmp_path):
    """A memory:// checkpoint directory holding one complete tag, step_00000001."""
    fs = fsspec.filesystem("memory")
    url = f"memory://{tmp_path.name}/checkpoints"
    _tiny_checkpoint(tmp_path / "src" / "step_00000001", 1)
    _upload(fs, tmp_path / "src", url)
    fs.pipe_file(f"{url}/latest", b"step_00000001")
    yield fs, url
    fs.rm(f"memory://{tmp_path.name}", recursive=True)


def test_remote_fetch_of_a_legitimate_checkpoint(store, tmp_path):
    fs, url = store
    got = fetch_remote(url, "latest", tmp_path / "cache")
    assert got == tmp_path / "cache" / "step_00000001" and load_trainer_state(got)["step"] == 1


@pytest.mark.parametrize("bad", ["../evil", "../../evil", "ABSOLUTE", "zero/../../evil"])
def test_remote_manifest_names_cannot_leave_the_cache(store, tmp_path, bad):
    fs, url = store
    bad = str(tmp_path / "abs_evil") if bad == "ABSOLUTE" else bad
    manifest = {"tag": "step_00000002", "step": 2, "files": {
        "trainer_state.pt": json.loads(fs.cat_file(f"{url}/step_00000001/manifest.json"))["files"]["trainer_state.pt"],
        bad: {"bytes": 4, "sha256": "0" * 64}}}
    fs.pipe_file(f"{url}/step_00000002/trainer_state.pt", fs.cat_file(f"{url}/step_00000001/trainer_state.pt"))
    fs.pipe_file(f"{url}/step_00000002/{bad.lstrip('/')}", b"evil")
    fs.pipe_file(f"{url}/step_00000002/manifest.json", json.dumps(manifest).encode())
    fs.pipe_file(f"{url}/latest", b"step_00000002")
    cache = tmp_path / "sub" / "cache"
    for tag in ("latest", "step_00000002"):  # refused, not skipped for step_00000001
        with pytest.raises(UnsafeCheckpointError) as e:
            fetch_remote(url, tag, cache, warn=pytest.fail)
        assert repr(bad) in str(e.value) and "manifest.json" in str(e.value)
    assert list(tmp_path.rglob("*evil*")) == []
    assert not (cache / "step_00000002").exists()  # nothing written before every name was checked


def test_remote_manifest_name_through_a_symlink_is_refused(store, tmp_path):
    fs, url = store
    outside = tmp_path / "outside"
    outside.mkdir()
    cache = tmp_path / "cache"
    (cache / "step_00000001").mkdir(parents=True)
    (cache / "step_00000001" / "zero").symlink_to(outside)
    meta = {"bytes": 4, "sha256": "0" * 64}
    manifest = json.loads(fs.cat_file(f"{url}/step_00000001/manifest.json"))
    manifest["files"]["zero/fp32.pt"] = meta
    fs.pipe_file(f"{url}/step_00000001/zero/fp32.pt", b"evil")
    fs.pipe_file(f"{url}/step_00000001/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(UnsafeCheckpointError, match="resolves outside"):
        fetch_remote(url, "step_00000001", cache)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("bad", ["../x", "/etc", "..", "a/b", ""])
def test_remote_latest_and_tags_cannot_leave(store, tmp_path, bad):
    fs, url = store
    fs.pipe_file(f"{url}/latest", bad.encode())
    if bad == "":  # an empty pointer names nothing: the newest complete tag
        assert fetch_remote(url, "latest", tmp_path / "cache").name == "step_00000001"
        return
    with pytest.raises(UnsafeCheckpointError) as e:
        fetch_remote(url, "latest", tmp_path / "cache", warn=pytest.fail)
    assert repr(bad) in str(e.value) and f"{url}/latest" in str(e.value)
    with pytest.raises(UnsafeCheckpointError, match="refusing checkpoint tag"):
        fetch_remote(url, bad, tmp_path / "cache")
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no cache: refused before anything is written


@pytest.mark.parametrize("bad", ["../x", "/etc", "../step_00000001", "link"])
def test_local_latest_and_tags_cannot_leave(tmp_path, capsys, bad):
    root = tmp_path / "run" / "checkpoints"
    _tiny_checkpoint(root / "step_00000001", 1)
    _tiny_checkpoint(tmp_path / "run" / "x", 5)  # a complete checkpoint where '../x' leads
    (root / "link").symlink_to(tmp_path / "run" / "x")
    (root / "latest").write_text(bad)
    with pytest.raises(UnsafeCheckpointError) as e:  # refused, not skipped for step_00000001
        resolve(str(tmp_path / "run"), verify_files=True, warn=pytest.fail)
    assert repr(bad) in str(e.value) and str(root / "latest") in str(e.value)
    with pytest.raises(UnsafeCheckpointError, match="refusing checkpoint tag"):
        resolve(str(tmp_path / "run"), bad)
    rc, _, err = vlm(capsys, "ckpt", "inspect", tmp_path / "run")
    assert rc == 1 and repr(bad) in err


def test_local_manifest_names_cannot_leave(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    _tiny_checkpoint(ckpt, 1)
    (tmp_path / "secret").write_text("s")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["../../../secret"] = {"bytes": 1, "sha256": "0" * 64}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeCheckpointError, match="'../../../secret'"):
        verify(ckpt)
    rc, out, _ = vlm(capsys, "ckpt", "list", tmp_path / "run", "--json")
    assert rc == 1 and json.loads(out)[0]["status"] == "unsafe"
