"""Elastic runs, the parts that need no cluster: `train.num_workers: [min, max]` is
validated, a global batch that some size in the range cannot split is refused before Ray
(exit 2) naming the sizes that split it and a batch every size splits, gradient
accumulation keeps the global batch at every size, and a resume at another size says so in
one line naming both sizes and the step."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli.main import main
from cluster.preflight import check_batch
from vlm.config import ConfigError, load_config
from vlm.train.elastic import resize_line

REPO = Path(__file__).resolve().parents[2]
TINY = ["train.micro_batch_size=16", "metrics.enabled=false"]


def cfg(*sets: str):
    return load_config(None, [*TINY, *sets])


def test_a_range_is_min_max_and_a_number_is_fixed():
    c = cfg("train.num_workers=[1, 4]", "train.global_batch_size=192")
    assert c.train.worker_range() == (1, 4) and c.train.elastic
    assert c.train.model_dump(mode="json")["num_workers"] == [1, 4]
    fixed = cfg("train.num_workers=3")
    assert fixed.train.worker_range() == (3, 3) and not fixed.train.elastic


@pytest.mark.parametrize("value, why", [("[2, 1]", "1 ≤ min ≤ max"), ("[0, 2]", "1 ≤ min ≤ max"),
                                        ("0", "≥ 1"), ("[1, 2, 3]", "num_workers")])
def test_bad_ranges_are_refused_naming_the_key(value, why):
    with pytest.raises(ConfigError) as e:
        cfg(f"train.num_workers={value}", "train.global_batch_size=32")
    assert "train.num_workers" in str(e.value) and why in str(e.value)


def test_a_range_needs_a_global_batch_to_keep():
    with pytest.raises(ConfigError, match="is a range: set train.global_batch_size"):
        cfg("train.num_workers=[1, 2]")


def test_every_size_in_the_range_keeps_the_global_batch():
    c = cfg("train.num_workers=[1, 4]", "train.global_batch_size=192")
    check_batch(c)
    for n in range(1, 5):
        assert c.train.micro_batch_size * c.train.accum_steps(n) * n == 192


def test_a_batch_some_size_cannot_split_names_the_sizes_that_can():
    with pytest.raises(ConfigError) as e:
        check_batch(cfg("train.num_workers=[1, 3]", "train.global_batch_size=32"))
    msg = str(e.value)
    assert "sizes that split it: 1, 2" in msg and "lcm(1..3) = 96" in msg, msg


def test_train_refuses_it_with_exit_2_before_ray(capsys, tmp_path):
    code = main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--set", f"run_dir={tmp_path / 'run'}", "--set", "train.num_workers=[2, 3]",
                 "--set", "train.micro_batch_size=16", "--set", "train.global_batch_size=64"])
    err = capsys.readouterr().err
    assert code == 2 and "sizes that split it: 2;" in err and "e.g. 96" in err, err


def state(world_size: int, step: int, **train) -> dict:
    return {"world_size": world_size, "step": step,
            "config": cfg(*(f"train.{k}={v}" for k, v in train.items())).model_dump(mode="json")}


def test_resize_line_names_both_sizes_the_step_and_the_kept_batch():
    new = cfg("train.num_workers=[1, 2]", "train.global_batch_size=32")
    line = resize_line(state(2, 12, num_workers="[1, 2]", global_batch_size=32), new, 1)
    assert line == ("resize: world size 2 -> 1 at step 12: gradient accumulation 1 -> 2 per worker, "
                    "global batch 32 unchanged")
    assert resize_line(state(1, 12, num_workers="[1, 2]", global_batch_size=32), new, 1) is None


def test_resize_line_warns_when_the_global_batch_changes():
    line = resize_line(state(2, 5, num_workers=2), cfg("train.num_workers=1"), 1)
    assert "global batch 32 -> 16 (set train.global_batch_size to keep it)" in line, line
