from pathlib import Path

import pytest

from vlm.checkpoint.layout import tag_for_step
from vlm.checkpoint.resolve import resolve
from vlm.checkpoint.store import prune
from vlm.checkpoint.verify import verify, write_manifest


def make(root: Path, step: int, *, complete: bool = True) -> Path:
    d = root / tag_for_step(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"weights %d" % step)
    (d / "trainer_state.pt").write_bytes(b"state %d" % step)
    if complete:
        write_manifest(d, step)
    return d


@pytest.fixture
def run(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        make(root, step)
    (root / "latest").write_text("step_00000030")
    return tmp_path


def test_latest_resolves_and_verifies(run):
    assert resolve(str(run), verify_files=True).name == "step_00000030"
    assert resolve(str(run), "step_00000010").name == "step_00000010"
    with pytest.raises(FileNotFoundError, match="step_00000099 is incomplete or missing"):
        resolve(str(run), "step_00000099")


def test_corrupt_newest_falls_back_to_previous_and_says_which_file(run):
    with open(run / "checkpoints" / "step_00000030" / "trainer_state.pt", "ab") as f:
        f.write(b"garbage")
    said = []
    ckpt = resolve(str(run), verify_files=True, warn=said.append)
    assert ckpt.name == "step_00000020"
    assert len(said) == 1 and "trainer_state.pt does not match its manifest" in said[0]


def test_truncated_and_missing_files_are_detected(run):
    ckpt = run / "checkpoints" / "step_00000030"
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"w")  # truncated
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt does not match"):
        verify(ckpt)
    (ckpt / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt does not match"):
        verify(ckpt)


def test_incomplete_newest_is_skipped(run):
    make(run / "checkpoints", 40, complete=False)
    (run / "checkpoints" / "latest").write_text("step_00000040")
    said = []
    assert resolve(str(run), verify_files=True, warn=said.append).name == "step_00000030"
    assert "no manifest.json" in said[0]


def test_nothing_complete_is_an_error(tmp_path):
    make(tmp_path / "checkpoints", 5, complete=False)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve(str(tmp_path), warn=lambda m: None)


def test_prune_keeps_the_newest_and_leaves_incomplete_dirs(run):
    partial = make(run / "checkpoints", 35, complete=False)
    removed = prune(run / "checkpoints", keep=2)
    assert [d.name for d in removed] == ["step_00000010"]
    left = sorted(d.name for d in (run / "checkpoints").iterdir() if d.is_dir())
    assert left == ["step_00000020", "step_00000030", partial.name]
    assert prune(run / "checkpoints", keep=0) == []
