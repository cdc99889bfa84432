"""`vlm data score` decodes shard images within ingest's pixel budget: a decompression bomb
in someone else's shard is refused from its header, by name, before the scorer or the
perceptual hash decodes it (unbounded, it takes about 1 GB of memory to decode)."""
from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from support.badshards import bad_samples, write_bad_shard
from data_pipeline.config import ScoreConfig
from data_pipeline.curate.score import score_shard


def _shard(tmp_path, key: str):
    samples = bad_samples()
    members = {"good": {"jpg": samples["badlatin1"][0]["jpg"], "txt": b"a red square"}, key: samples[key][0]}
    return write_bad_shard(tmp_path / "00000.tar", members)


@pytest.mark.parametrize("key, reason", [("badbomb", "too_many_pixels"), ("badtrunc", "decode_error"),
                                         ("badnoimage", "has no image")])
def test_score_refuses_a_bad_image_by_name_before_the_scorer(tmp_path, key, reason):
    tar = _shard(tmp_path, key)
    seen = []
    with pytest.raises(ValueError) as e:
        score_shard(str(tar), str(tmp_path / "00000_scores.parquet"), ScoreConfig(),
                    scorer=lambda batch: seen.append(batch) or [0.0] * len(batch))
    assert key in str(e.value) and "00000.tar" in str(e.value) and reason in str(e.value)
    assert not seen and not (tmp_path / "00000_scores.parquet").exists()


def test_score_budget_is_configurable_and_good_shards_score(tmp_path):
    tar = _shard(tmp_path, "badlatin1")  # two decodable 32x32 images
    out = tmp_path / "00000_scores.parquet"
    score_shard(str(tar), str(out), ScoreConfig(), scorer=None)
    assert pq.read_table(out).column("width").to_pylist() == [32, 32]
    with pytest.raises(ValueError, match="too_many_pixels"):
        score_shard(str(tar), str(out), ScoreConfig(max_pixels=1000), scorer=None)


def test_the_bomb_never_decodes(tmp_path):
    """Peak memory of a fresh process scoring the bomb shard stays far from the ~1 GB a decode takes."""
    tar = _shard(tmp_path, "badbomb")
    code = ("import resource, sys; from data_pipeline.config import ScoreConfig; "
            "from data_pipeline.curate.score import score_shard\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    score_shard(sys.argv[1], sys.argv[2], ScoreConfig(), None)\n"
            "except ValueError as e:\n    print('refused', e)\n"
            "print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)")
    out = subprocess.run([sys.executable, "-c", code, str(tar), str(tmp_path / "s.parquet")], capture_output=True,
                         text=True, timeout=120, cwd=str(tmp_path.parent)).stdout
    assert "refused" in out and "too_many_pixels" in out, out
    grew_kb = int(out.rsplit("grew_kb", 1)[1])
    assert grew_kb < 100_000, out
