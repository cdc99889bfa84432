"""`vlm data score` and `vlm data filter` read data.score / data.filter of the config tree;
their flags override it and default to it (parsing only: no Ray starts)."""
from __future__ import annotations

import pytest

from cluster.cli.data import FILTER_FLAGS, SCORE_FLAGS, filter_config, score_config
from cluster.cli.main import build_parser
from data_pipeline.config import FilterConfig, ScoreConfig
from vlm.config import ConfigError


def parse(*argv):
    return build_parser().parse_args([str(a) for a in argv])


def test_flag_defaults_are_the_config_defaults():
    score_args = parse("data", "score", "shards")
    filter_args = parse("data", "filter", "shards", "--output", "out")
    assert all(getattr(score_args, f) is None for f in SCORE_FLAGS)
    assert all(getattr(filter_args, f) is None for f in FILTER_FLAGS)
    assert score_config(score_args) == ScoreConfig()
    assert filter_config(filter_args) == FilterConfig()
    assert ScoreConfig().batch_size == 64 and FilterConfig().near_dup_distance == 4


def test_set_reaches_the_config_and_flags_override_it():
    args = parse("data", "score", "shards", "--set", "data.score.batch_size=7", "--set", "data.score.hash_size=12")
    cfg = score_config(args)
    assert (cfg.batch_size, cfg.hash_size, cfg.actors) == (7, 12, 0)
    args = parse("data", "score", "shards", "--set", "data.score.batch_size=7", "--batch-size", "5")
    assert score_config(args).batch_size == 5
    args = parse("data", "filter", "shards", "--output", "out", "--set", "data.filter.shard_size=9",
                 "--set", "data.filter.min_clip_score=0.25", "--top-fraction", "0.5")
    cfg = filter_config(args)
    assert (cfg.shard_size, cfg.min_clip_score, cfg.top_fraction, cfg.near_dup_distance) == (9, 0.25, 0.5, 4)


def test_config_file_and_bad_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  score:\n    actors: 3\n  filter:\n    near_dup_distance: -1\n")
    assert score_config(parse("data", "score", "shards", "--config", path)).actors == 3
    assert filter_config(parse("data", "filter", "shards", "--output", "o", "--config", path)).near_dup_distance == -1
    with pytest.raises(ConfigError, match="data.score.batch_size"):
        score_config(parse("data", "score", "shards", "--set", "data.score.batch_size=0"))
    with pytest.raises(ValueError, match="top_fraction"):  # a flag is validated as the config is
        filter_config(parse("data", "filter", "shards", "--output", "o", "--top-fraction", "2"))


def test_curation_never_starts_ray(tmp_path):
    """data_pipeline uses the caller's Ray; without one it says where to get it."""
    import ray

    from data_pipeline.curate.score import score
    from support.shardgen import write_shards

    if ray.is_initialized():
        pytest.skip("another test's Ray is running in this process")
    write_shards(tmp_path / "shards", n=4, per_shard=4)
    with pytest.raises(RuntimeError, match=r"cluster\.ray\.session\.ray_session"):
        score(str(tmp_path / "shards"), ScoreConfig(), progress=False)
    assert not ray.is_initialized()


def test_ingest_backend_follows_the_ray_address(monkeypatch):
    """Local processes unless a Ray address is given (flag or RAY_ADDRESS); clashes exit."""
    from cluster.cli.data import ingest_backend

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = ("data", "ingest", "--input", "t.parquet", "--output", "out")
    assert ingest_backend(parse(*base)) == "local"
    assert ingest_backend(parse(*base, "--processes", "3")) == "local"
    assert ingest_backend(parse(*base, "--backend", "ray")) == "ray"
    assert ingest_backend(parse(*base, "--ray-address", "127.0.0.1:6379")) == "ray"
    with pytest.raises(SystemExit, match="--backend local runs without Ray.*--ray-address=127.0.0.1:6379"):
        ingest_backend(parse(*base, "--backend", "local", "--ray-address", "127.0.0.1:6379"))
    with pytest.raises(SystemExit, match="--processes is for --backend local"):
        ingest_backend(parse(*base, "--backend", "ray", "--processes", "2"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert ingest_backend(parse(*base)) == "ray"
    with pytest.raises(SystemExit, match="RAY_ADDRESS=127.0.0.1:6379"):
        ingest_backend(parse(*base, "--backend", "local"))


@pytest.mark.parametrize("value, message", [("0", "must be at least 1, got 0"), ("two", "not a whole number")])
def test_ingest_processes_must_be_positive(value, message, capsys):
    with pytest.raises(SystemExit):
        parse("data", "ingest", "--input", "t", "--output", "o", "--processes", value)
    assert f"argument --processes: {message}" in capsys.readouterr().err
