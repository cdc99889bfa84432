import pytest
import yaml

from cluster.cli import main
from vlm.config import ConfigError, RunConfig, dump_config, load_config


def test_defaults_validate_and_demo_config_loads():
    assert load_config("configs/demo.yaml").train.zero_stage == 2
    assert RunConfig().objectives[0].name == "clip_infonce"


def test_unknown_key_names_path_and_allowed_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  vision:\n    widht: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "model.vision.widht: unknown key" in msg
    assert "allowed keys:" in msg and "width" in msg and "patch_size" in msg


def test_bad_literal_value_names_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.zero_stage=5"])
    msg = str(e.value)
    assert "train.zero_stage" in msg and "0, 1, 2 or 3" in msg and "got 5" in msg


def test_bad_range_and_type():
    with pytest.raises(ConfigError, match=r"optim.lr: Input should be greater than 0"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"train.steps: .*integer"):
        load_config(None, ["train.steps=many"])


def test_unknown_key_inside_list_item():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["objectives=[{name: clip_infonce, wieght: 2}]"])
    assert "objectives.0.wieght: unknown key" in str(e.value)
    assert "name, weight" in str(e.value)


def test_overrides_are_typed_and_nested():
    cfg = load_config("configs/demo.yaml", ["train.steps=7", "data.ingest.fetch.deadline_s=1.5",
                                            "eval.recall_at=[1, 2]"])
    assert cfg.train.steps == 7 and cfg.data.ingest.fetch.deadline_s == 1.5 and cfg.eval.recall_at == [1, 2]
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="train.steps is not a section"):
        load_config("configs/demo.yaml", ["train.steps.x=1"])


def test_cross_field_check_names_both_keys():
    with pytest.raises(ConfigError, match="data.ingest.image_size .* model.vision.image_size"):
        load_config(None, ["model.vision.image_size=64"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dump_roundtrips():
    cfg = load_config("configs/demo.yaml", ["train.steps=9"])
    again = RunConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_cli_exits_nonzero_with_key_path(capsys, tmp_path):
    rc = main(["train", "--config", "configs/demo.yaml", "--set", "train.zero_stage=7",
               "--set", f"run_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.zero_stage" in err and "0, 1, 2 or 3" in err
