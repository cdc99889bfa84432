import pytest
import yaml

from cluster.cli.main import main
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
    assert "init_temperature, learn_temperature, name, weight" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["objectives=[{name: siglip, head_dim: 3}]"])
    assert "objectives.0.head_dim: unknown key; allowed keys: init_bias" in str(e.value)


def test_unknown_objective_lists_the_registered_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["objectives=[{name: clipp}]"])
    msg = str(e.value)
    assert "objectives.0" in msg and "'clip_infonce', 'siglip', 'slip_image', 'unicl'" in msg


def test_unicl_needs_labels():
    with pytest.raises(ConfigError, match="unicl needs labels"):
        load_config(None, ["objectives=[{name: unicl}]", "data.label_field=null"])


def test_overrides_are_typed_and_nested():
    cfg = load_config("configs/demo.yaml", ["train.steps=7", "data.ingest.fetch.deadline_s=1.5",
                                            "eval.recall_at=[1, 2]"])
    assert cfg.train.steps == 7 and cfg.data.ingest.fetch.deadline_s == 1.5 and cfg.eval.recall_at == [1, 2]
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="train.steps is not a section"):
        load_config("configs/demo.yaml", ["train.steps.x=1"])


def test_ingest_image_size_is_independent_of_the_model():
    assert load_config(None, ["model.vision.image_size=64"]).data.ingest.image_size == 256
    assert load_config(None, ["data.ingest.image_size=224"]).model.vision.image_size == 32


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


def test_model_preset_is_expanded_and_overridable():
    cfg = load_config(None, ["model.preset=ViT-B-16", "model.text.context_length=32",
                             "data.ingest.image_size=224"])
    assert (cfg.model.vision.patch_size, cfg.model.vision.width, cfg.model.embed_dim) == (16, 768, 512)
    assert cfg.model.text.context_length == 32 and cfg.model.preset == "ViT-B-16"
    with pytest.raises(ConfigError, match="model.preset: unknown preset 'ViT-X'; registered: .*ViT-B-16"):
        load_config(None, ["model.preset=ViT-X"])


def test_the_demo_section_is_the_demos_alone():
    from demo.config import CorpusConfig, load_demo_config

    cfg = load_config("configs/demo.yaml")  # `vlm train` and every other command accept the file
    assert "corpus" not in cfg.data.model_dump() and (cfg.name, cfg.run_dir) == ("demo", "runs/demo")
    assert cfg.eval.label_template == "{colour} {shape}"
    for path in ("configs/demo.yaml", "configs/coca.yaml", "configs/flava.yaml", "configs/blip.yaml"):
        run, demo = load_demo_config(path, ["demo.corpus.num_train=12", "train.steps=3"])
        assert demo.corpus == CorpusConfig(num_train=12) and run.train.steps == 3
        assert run == load_config(path, ["train.steps=3"])
    with pytest.raises(ConfigError, match=r"demo.corpus.num_trian: unknown key; allowed keys: broken_urls"):
        load_demo_config("configs/demo.yaml", ["demo.corpus.num_trian=12"])
    with pytest.raises(ConfigError, match=r"demo.corpus.num_train: Input should be greater than or equal to 0"):
        load_demo_config("configs/demo.yaml", ["demo.corpus.num_train=-1"])
    with pytest.raises(ConfigError) as e:  # dropping the legacy key lets no other unknown key through
        load_config(None, ["data.corpus.seed=1", "data.ingset.threads=2"])
    assert "data.ingset: unknown key" in str(e.value) and "corpus" not in str(e.value)


def test_neutral_defaults():
    cfg = RunConfig()
    assert cfg.name == "run" and cfg.eval.label_template == "{label}"


def test_a_saved_config_with_the_legacy_corpus_key_loads_and_resumes(tmp_path):
    from demo.config import load_demo_config
    from vlm.config_changes import check_resume_config, config_changes

    cfg = load_config("configs/demo.yaml")
    saved = yaml.safe_load(dump_config(cfg))
    saved["data"]["corpus"] = {"seed": 3, "num_train": 50, "num_heldout": 6, "image_size": 64, "broken_urls": False}
    assert RunConfig.model_validate(saved) == cfg  # a checkpoint's or run directory's config
    assert config_changes(saved, cfg) == []
    check_resume_config(saved, cfg, checkpoint="ckpt")
    saved["train"]["zero_stage"] = 1
    assert [k for k, _, _ in config_changes(saved, cfg)] == ["train.zero_stage"]
    old = tmp_path / "old.yaml"  # a config file written before the demo section: the demo reads it
    old.write_text(yaml.safe_dump({**saved, "train": {"steps": 5}}))
    run, demo = load_demo_config(old)
    assert demo.corpus.num_train == 50 and demo.corpus.seed == 3 and run.train.steps == 5
    run, demo = load_demo_config(old, ["demo.corpus.num_heldout=2"])  # --set demo.* over the legacy key
    assert (demo.corpus.num_train, demo.corpus.num_heldout, demo.corpus.seed) == (50, 2, 3)
