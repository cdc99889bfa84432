import itertools

import pytest

from data_pipeline.reader import ShardReader, list_shards
from shardgen import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, n=50, per_shard=10)
    (d / "00009.tar").write_bytes(b"")  # uncommitted: no _stats.json, must be ignored
    return list_shards(str(d))


def keys(reader, n):
    return [s["__key__"] for s in itertools.islice(iter(reader), n)]


def test_only_committed_shards_are_listed(shards, tmp_path):
    assert len(shards) == 5 and all(s.endswith(".tar") for s in shards)
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        list_shards(str(tmp_path))


def test_deterministic_and_epochs_cover_everything(shards):
    a = keys(ShardReader(shards, seed=3, shuffle_block=4), 100)
    b = keys(ShardReader(shards, seed=3, shuffle_block=4), 100)
    assert a == b
    assert sorted(a[:50]) == sorted(set(a[:50])) and len(set(a[:50])) == 50  # one epoch = every sample once
    assert a[:50] != a[50:]  # the next epoch is shuffled differently
    assert keys(ShardReader(shards, seed=4, shuffle_block=4), 50) != a[:50]


@pytest.mark.parametrize("consumed", [0, 3, 10, 23, 57])
def test_resume_continues_exactly(shards, consumed):
    full = keys(ShardReader(shards, rank=1, world_size=2, seed=1, shuffle_block=4), consumed + 30)
    first = ShardReader(shards, rank=1, world_size=2, seed=1, shuffle_block=4)
    it = iter(first)
    for _ in range(consumed):
        next(it)
    state = first.state_dict()
    second = ShardReader(shards, rank=1, world_size=2, seed=1, shuffle_block=4)
    second.load_state_dict(state)
    assert keys(second, 30) == full[consumed:]


def test_ranks_read_disjoint_shards(shards):
    r0 = set(keys(ShardReader(shards, rank=0, world_size=2), 20))
    r1 = set(keys(ShardReader(shards, rank=1, world_size=2), 20))
    assert r0.isdisjoint(r1)


def test_clear_errors(shards):
    with pytest.raises(ValueError, match="5 shard.* cannot feed 8 ranks"):
        ShardReader(shards, world_size=8)
    state = ShardReader(shards, world_size=1).state_dict()
    with pytest.raises(ValueError, match="saved for 5 shards on 1 ranks"):
        ShardReader(shards, rank=0, world_size=2).load_state_dict(state)
