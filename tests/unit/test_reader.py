import itertools
import json
from collections import Counter

import pytest

from data_pipeline.shards.reader import MixedReader, ReaderConfig, ShardReader, build_reader
from data_pipeline.shards.samples import list_shards
from support.shardgen import write_shards


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


# -- slots, resampling, mixes, resharding ---------------------------------------------------

BOUND = 2000  # every read in these tests is bounded


@pytest.fixture(scope="module")
def second_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("second")
    write_shards(d, n=30, per_shard=10, seed=1)
    return str(d)


def take(reader, n):
    """n samples, and the reader's state right after the n-th (JSON round trip: states
    travel through checkpoints as plain data)."""
    it = iter(reader)
    out = [next(it) for _ in range(n)]
    return out, json.loads(json.dumps(reader.state_dict()))


def ident(s):
    return (s.get("__source__", 0), s["__key__"])


def read_through(reader, epoch):
    """Samples until the reader has finished `epoch` (the first sample of a later epoch is dropped)."""
    out = []
    for s in itertools.islice(iter(reader), BOUND):
        if s["__epoch__"] > epoch:
            return out
        out.append(s)
    raise AssertionError("reader did not finish the epoch within the bound")


def test_ranks_and_workers_split_the_epoch_disjointly(shards):
    seen = []
    for rank in range(2):
        for worker in range(2):
            r = ShardReader(shards, rank=rank, world_size=2, worker=worker, num_workers=2, seed=5, shuffle_block=4)
            part = read_through(r, 0)
            assert part and all(s["__epoch__"] == 0 for s in part)
            seen.append([s["__key__"] for s in part])
    flat = [k for part in seen for k in part]
    assert len(flat) == 50 and len(set(flat)) == 50  # every sample once, by exactly one slot
    # one worker per rank is the plain rank split
    assert keys(ShardReader(shards, rank=1, world_size=2, worker=0, num_workers=1, seed=5, shuffle_block=4), 20) \
        == keys(ShardReader(shards, rank=1, world_size=2, seed=5, shuffle_block=4), 20)


def make_epochs(shards, _):
    return ShardReader(shards, rank=1, world_size=2, worker=1, num_workers=2, seed=2, shuffle_block=3)


def make_resample(shards, _):
    return ShardReader(shards, rank=0, world_size=2, seed=2, shuffle_block=3, resample=True)


def make_mix(shards, second):
    cfg = ReaderConfig(shuffle_block=3, mix=[{"shards": shards[0].rsplit("/", 1)[0], "weight": 2.0},
                                             {"shards": second, "weight": 1.0}])
    return build_reader(cfg, "unused", rank=1, world_size=2, seed=9)


def make_resharded(shards, _):
    """A 1-rank reader resumed from 2 old ranks: starts with pending units."""
    old = []
    for rank, n in ((0, 13), (1, 4)):
        _, state = take(ShardReader(shards, rank=rank, world_size=2, seed=2, shuffle_block=3), n)
        old.append(state)
    r = ShardReader(shards, seed=2, shuffle_block=3)
    r.load_rank_states(old)
    return r


@pytest.mark.parametrize("make", [make_epochs, make_resample, make_mix, make_resharded])
@pytest.mark.parametrize("consumed", [0, 7, 31])
def test_every_mode_resumes_exactly_mid_stream(shards, second_set, make, consumed):
    full = [ident(s) for s in itertools.islice(iter(make(shards, second_set)), consumed + 25)]
    _, state = take(make(shards, second_set), consumed)
    resumed = make(shards, second_set)
    resumed.load_state_dict(state)
    assert [ident(s) for s in itertools.islice(iter(resumed), 25)] == full[consumed:]


def test_resampling_draws_with_replacement_without_epochs(shards):
    r = ShardReader(shards[:2], rank=3, world_size=4, seed=1, shuffle_block=4, resample=True)  # 2 shards, 4 ranks
    samples = [s for s in itertools.islice(iter(r), 120)]
    draws = [s["__draw__"] for s in samples]
    assert draws == sorted(draws) and draws[-1] >= 11 and "__epoch__" not in samples[0]
    assert {s["__shard__"] for s in samples} == set(shards[:2])
    # a shard drawn twice is shuffled differently each time
    by_draw = {}
    for s in samples:
        by_draw.setdefault(s["__draw__"], []).append(s)
    same_shard = [d for d in by_draw if by_draw[d][0]["__shard__"] == by_draw[0][0]["__shard__"] and d > 0]
    assert same_shard and [s["__key__"] for s in by_draw[same_shard[0]]] != [s["__key__"] for s in by_draw[0]]
    other = ShardReader(shards[:2], rank=2, world_size=4, seed=1, shuffle_block=4, resample=True)
    assert keys(other, 60) != [s["__key__"] for s in samples[:60]]


def test_mix_follows_its_weights(shards, second_set):
    root = shards[0].rsplit("/", 1)[0]
    for w0, w1 in ((3.0, 1.0), (1.0, 4.0)):
        cfg = ReaderConfig(shuffle_block=5, mix=[{"shards": root, "weight": w0}, {"shards": second_set, "weight": w1}])
        sources = [s["__source__"] for s in itertools.islice(iter(build_reader(cfg, "", rank=0, world_size=1,
                                                                                 seed=0)), 2000)]
        assert abs(sources.count(0) / 2000 - w0 / (w0 + w1)) < 0.04
    # each source keeps its own epoch discipline: the first 50 samples from source 0 are its whole epoch
    cfg = ReaderConfig(shuffle_block=5, mix=[{"shards": root, "weight": 1.0}, {"shards": second_set, "weight": 1.0}])
    first = [s for s in itertools.islice(iter(build_reader(cfg, "", rank=0, world_size=1, seed=0)), 400)
             if s["__source__"] == 0][:50]
    assert len({s["__key__"] for s in first}) == 50


def old_run(shards, layout, consumed, **kw):
    """Old slots, each having read `consumed[slot]` samples -> (their samples, their states)."""
    world_size, num_workers = layout
    samples, states = [], []
    for slot in range(world_size * num_workers):
        r = ShardReader(shards, rank=slot // num_workers, world_size=world_size, worker=slot % num_workers,
                        num_workers=num_workers, **kw)
        got, state = take(r, consumed[slot])
        samples += got
        states.append({**state, "batches": 3})  # BatchLoader adds its own key: ignored
    return samples, states


@pytest.mark.parametrize("old_layout,new_layout,consumed", [
    ((2, 1), (1, 1), [23, 7]),      # 2 -> 1, rank 0 in its 3rd shard, rank 1 in its 1st
    ((1, 1), (2, 1), [17]),         # 1 -> 2
    ((2, 1), (3, 1), [35, 4]),      # rank 0 already in epoch 1, rank 1 still in epoch 0
    ((2, 2), (1, 3), [5, 10, 0, 12]),  # slots of ranks x workers
])
def test_resume_at_another_world_size_reads_the_rest_exactly_once(shards, old_layout, new_layout, consumed):
    kw = dict(seed=4, shuffle_block=3)
    old, states = old_run(shards, old_layout, consumed, **kw)
    world_size, num_workers = new_layout
    new = []
    for slot in range(world_size * num_workers):
        r = ShardReader(shards, rank=slot // num_workers, world_size=world_size, worker=slot % num_workers,
                        num_workers=num_workers, **kw)
        r.load_rank_states(states)
        first_normal = r.epoch
        new += read_through(r, first_normal)
    assert first_normal >= max(s["epoch"] for s in states)
    for epoch in range(first_normal + 1):  # the unfinished epochs, then one whole epoch at the new size
        counts = Counter(s["__key__"] for s in old + new if s["__epoch__"] == epoch)
        assert len(counts) == 50 and set(counts.values()) == {1}, (epoch, counts.most_common(2))


def test_same_world_size_reshard_is_a_plain_load(shards):
    _, states = old_run(shards, (2, 1), [9, 14], seed=4, shuffle_block=3)
    a = ShardReader(shards, rank=1, world_size=2, seed=4, shuffle_block=3)
    a.load_rank_states(states)
    b = ShardReader(shards, rank=1, world_size=2, seed=4, shuffle_block=3)
    b.load_state_dict(states[1])
    assert a.state_dict() == b.state_dict() and keys(a, 30) == keys(b, 30)


def test_resampling_reshard_starts_a_new_generation(shards):
    old, states = old_run(shards, (2, 1), [6, 9], seed=4, shuffle_block=3, resample=True)
    r = ShardReader(shards, seed=4, shuffle_block=3, resample=True)
    r.load_rank_states(states)
    assert r.generation == 1 and r.draw == 0
    again = ShardReader(shards, seed=4, shuffle_block=3, resample=True)
    again.load_rank_states(states)
    got = keys(r, 40)
    assert got == keys(again, 40)  # deterministic
    assert got != keys(ShardReader(shards, seed=4, shuffle_block=3, resample=True), 40)  # not a replay of slot 0


def test_mix_reshard_continues_each_source_and_the_draws(shards, second_set):
    root = shards[0].rsplit("/", 1)[0]
    cfg = ReaderConfig(shuffle_block=3, mix=[{"shards": root, "weight": 1.0}, {"shards": second_set, "weight": 1.0}])
    old, states = [], []
    for rank, n in ((0, 21), (1, 8)):
        got, state = take(build_reader(cfg, "", rank=rank, world_size=2, seed=1), n)
        old += got
        states.append(state)
    r = build_reader(cfg, "", rank=0, world_size=1, seed=1)
    r.load_rank_states(states)
    assert r.generation == 1 and r.index == 0
    first_normal = r.readers[0].epoch
    new = []
    for s in itertools.islice(iter(r), BOUND):
        if s["__source__"] == 0 and s["__epoch__"] > first_normal:
            break
        new.append(s)
    counts = Counter(s["__key__"] for s in old + new if s["__source__"] == 0 and s["__epoch__"] == 0)
    assert len(counts) == 50 and set(counts.values()) == {1}


def test_reader_errors_are_clear(shards, second_set, tmp_path):
    one = ShardReader(shards, seed=0)
    with pytest.raises(ValueError, match="weights must be positive"):
        MixedReader([one, one], [1.0, 0.0])
    with pytest.raises(ValueError, match="weights must be positive"):
        MixedReader([one], [float("nan")])
    with pytest.raises(ValueError, match="needs 2 weights, got 1"):
        MixedReader([one, one], [1.0])
    with pytest.raises(ValueError, match="at least one shard set"):
        MixedReader([], [])
    with pytest.raises(ValueError, match="no shards to read"):
        ShardReader([], resample=True)
    with pytest.raises(ValueError, match="5 shard.* cannot feed 2 ranks x 3 workers"):
        ShardReader(shards, world_size=2, num_workers=3)
    with pytest.raises(ValueError, match="worker 3 is outside 0..1"):
        ShardReader(shards, worker=3, num_workers=2)
    with pytest.raises(ValueError, match="greater than 0"):
        ReaderConfig(mix=[{"shards": "x", "weight": -1}])
    with pytest.raises(ValueError, match="Extra inputs"):
        ReaderConfig(mix=[{"shards": "x", "weight": 1, "wieght": 2}])
    with pytest.raises(FileNotFoundError, match=r"data.reader.mix\[1\].shards: shard directory not found"):
        build_reader(ReaderConfig(mix=[{"shards": second_set, "weight": 1}, {"shards": str(tmp_path / "no"),
                                                                             "weight": 1}]),
                     "", rank=0, world_size=1, seed=0)
    _, states = old_run(shards, (2, 1), [3, 3], seed=0, shuffle_block=3)
    with pytest.raises(ValueError, match=r"lack 1 slot\(s\).*\[1\]"):
        ShardReader(shards).load_rank_states(states[:1])
    with pytest.raises(ValueError, match="no reader states given"):
        ShardReader(shards).load_rank_states([])
    with pytest.raises(ValueError, match="resample=False, this run has data.reader.resample=True"):
        ShardReader(shards, resample=True).load_rank_states(states)
    with pytest.raises(ValueError, match="belongs to rank 1 worker 0, this reader is rank 0"):
        ShardReader(shards, world_size=2).load_state_dict(states[1])
    with pytest.raises(ValueError, match="saved for 5 shards, this run has 4"):
        ShardReader(shards[:4]).load_rank_states(states)
    mixed = build_reader(ReaderConfig(mix=[{"shards": second_set, "weight": 1}]), "", rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="this run uses a mix reader"):
        mixed.load_rank_states(states)
    with pytest.raises(ValueError, match="saved by a mix reader"):
        ShardReader(shards).load_state_dict(mixed.state_dict())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "00000.tar").write_bytes(b"\0" * 1024)  # an empty tar archive: two zero blocks
    (empty / "00000_stats.json").write_text("{}")
    with pytest.raises(ValueError, match="hold no samples"):
        keys(ShardReader(list_shards(str(empty))), 1)


# -- broken samples ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_bad(tmp_path_factory):
    """3 shards of 6; the middle one also holds a caption that is not UTF-8, metadata that does
    not parse and metadata that is not an object."""
    from support.badshards import add_to_shard

    d = tmp_path_factory.mktemp("with_bad")
    tars = write_shards(d, n=18, per_shard=6)
    add_to_shard(tars[1], {"latin1": {"png": b"x", "txt": "caf\xe9".encode("latin-1")},
                           "badjson": {"png": b"x", "txt": b"ok", "json": b"{nope"},
                           "listjson": {"png": b"x", "txt": b"ok", "json": b"[1, 2]"}}, every=2)
    return list_shards(str(d))


def test_undecodable_caption_or_metadata_marks_the_sample_not_the_stream(with_bad):
    from data_pipeline.shards.samples import iter_tar_samples

    samples = {s["__key__"]: s for s in iter_tar_samples(with_bad[1])}
    assert len(samples) == 9  # the shard is read to its end
    assert samples["latin1"]["__bad__"][0] == "bad_caption" and "txt" not in samples["latin1"]
    assert "latin1.txt is not UTF-8" in samples["latin1"]["__bad__"][1]
    assert samples["badjson"]["__bad__"][0] == "bad_metadata" and "json" not in samples["badjson"]
    assert samples["listjson"]["__bad__"] == ("bad_metadata", "listjson.json is not an object")
    assert sum("__bad__" in s for s in samples.values()) == 3


@pytest.mark.parametrize("consumed", [0, 4, 9, 14, 21, 40])
def test_resume_with_bad_samples_continues_exactly(with_bad, consumed):
    """The position counts every sample emitted, bad ones too: a consumer that skips them
    resumes after the last one it read, never at one it skipped, never past a good one."""
    full = keys(ShardReader(with_bad, seed=2, shuffle_block=4), consumed + 30)
    first = ShardReader(with_bad, seed=2, shuffle_block=4)
    it = iter(first)
    for _ in range(consumed):
        next(it)
    second = ShardReader(with_bad, seed=2, shuffle_block=4)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert keys(second, 30) == full[consumed:]
    assert {"latin1", "badjson", "listjson"} <= set(full)
