"""The training loader with data worker processes (vlm.data.loader.TrainLoader): batches in
the turn the reader's slots define, exact resume with 0 and 2 workers, a resume at another
worker count that re-splits the epoch, normalisation with the model's statistics, views,
and errors raised in a worker reaching the training process."""
from __future__ import annotations

import functools
import io
import json
import random

import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.shards.reader import ShardReader
from data_pipeline.shards.samples import list_shards
from support.badshards import truncated_jpeg
from vlm.config import load_config
from vlm.data.config import AugmentConfig
from vlm.data.batches import BadDataError, BatchLoader, label_id
from vlm.data.loader import TrainLoader
from vlm.data.pixels import CLIP_MEAN, CLIP_STD, normalise
from vlm.data.tokenizer import TextEncoder, train_tokenizer
from vlm.train.loading import make_batches

N, PER_SHARD, BATCH = 96, 8, 8
IDS = {label_id(f"{i:064d}"): i for i in range(N)}  # image_id of sample i (its sha256 field)


def _jpeg(rng: random.Random, size: int) -> bytes:
    img = Image.new("RGB", (size, size + 8), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(4):
        x, y = rng.randrange(size), rng.randrange(size)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 6, y + 6))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 shards of 8 samples (sample i: caption "item i", sha256 i), and the tokenizer."""
    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(0)
    for s in range(N // PER_SHARD):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as w:
            for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
                w.write({"__key__": f"{i:05d}", "jpg": _jpeg(rng, 40), "txt": f"item {i}",
                         "json": {"sha256": f"{i:064d}", "label": f"class {i % 3}"}})
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"success": PER_SHARD}))
    text = TextEncoder(train_tokenizer([f"item {i}" for i in range(N)] + ["class 0"], vocab_size=200), 8)
    return root, text


def _cfg(root, *sets):
    return load_config(None, ["model.vision.image_size=16", "model.vision.patch_size=4",
                              f"data.train_shards={root}", f"train.micro_batch_size={BATCH}",
                              "data.reader.shuffle_block=4", *sets])


def _loader(corpus, workers, *sets, views=None, rank=0, world=1) -> TrainLoader:
    root, text = corpus
    cfg = _cfg(root, *sets)
    make = functools.partial(make_batches, cfg, text, frozenset({"image_ids"}), rank, world)
    return TrainLoader(make, num_workers=workers, mean=cfg.model.vision.image_mean, std=cfg.model.vision.image_std,
                       views=views, seed=cfg.train.seed, rank=rank, world_size=world)


def _take(loader: TrainLoader, n: int) -> list[dict]:
    try:
        return [loader.next_batch() for _ in range(n)]
    finally:
        loader.close()


def _ids(batches: list[dict]) -> list[int]:
    return [IDS[int(i)] for b in batches for i in b["image_ids"]]


def _reader_ids(root, slots: int, n_batches: int, states: list[dict] | None = None, first: int = 0) -> list[int]:
    """What the reader's slots (1 rank x `slots` workers) yield, a batch from each in turn
    from slot `first` on: the definition the loader must follow."""
    readers = [ShardReader(list_shards(str(root)), worker=w, num_workers=slots, shuffle_block=4)
               for w in range(slots)]
    for r in readers:
        if states is not None:
            r.load_rank_states(states)
    streams = [iter(r) for r in readers]
    out = []
    for b in range(n_batches):
        stream = streams[(first + b) % slots]
        out.extend(int(next(stream)["__key__"]) for _ in range(BATCH))
    return out


def test_batches_come_from_the_workers_in_turn(corpus):
    root, _ = corpus
    batches = _take(_loader(corpus, 2), 6)
    assert _ids(batches) == _reader_ids(root, 2, 6)
    assert batches[0]["images"].shape == (BATCH, 3, 16, 16) and batches[0]["images"].dtype == torch.float32


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_workers_continues_bitwise(corpus, workers):
    whole = _take(_loader(corpus, workers), 7)
    first = _loader(corpus, workers)
    _take(first, 3)
    state = first.state_dict()
    assert state["batches"] == 3 and len(state["workers"]) == max(1, workers)
    again = _loader(corpus, workers)
    again.load_rank_states([json.loads(json.dumps(state))])  # as a checkpoint stores it
    for a, b in zip(whole[3:], _take(again, 4), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_the_state_is_of_the_batches_taken_not_of_those_prefetched(corpus):
    loader = _loader(corpus, 2)
    _take_open = [loader.next_batch() for _ in range(3)]
    state = loader.state_dict()  # the workers have read ahead by now
    loader.close()
    # worker 0 gave batches 0 and 2, worker 1 gave batch 1
    emitted = [s["sample_cursor"] + PER_SHARD * s["shard_cursor"] for s in state["workers"]]
    assert emitted == [2 * BATCH, BATCH] and len(_take_open) == 3


@pytest.mark.parametrize("before,after", [(2, 3), (2, 0), (0, 2)])
def test_resume_at_another_worker_count_resplits_the_rest_of_the_epoch(corpus, before, after):
    root, _ = corpus
    first = _loader(corpus, before)
    seen = _ids(_take(first, 5))
    state = json.loads(json.dumps(first.state_dict()))
    again = _loader(corpus, after)
    again.load_rank_states([state])
    n_after = 7
    got = _ids(_take(again, n_after))
    # batch n always comes from worker n mod W: this one starts at batch 5
    assert got == _reader_ids(root, max(1, after), n_after, state["workers"], first=5 % max(1, after))
    # the rest of the epoch comes first, each sample once, none of those already seen
    rest = N - len(seen)
    assert len(set(seen)) == len(seen) and not set(seen) & set(got[:rest])


def test_resume_at_another_world_size_resplits_every_ranks_rest(corpus):
    """2 ranks x 2 workers -> 1 rank x 2 workers: the one rank reads what the 4 old slots left."""
    root, _ = corpus
    states, seen = [], []
    for rank in range(2):
        old = _loader(corpus, 2, rank=rank, world=2)
        seen += _ids(_take(old, 3))
        states.append(json.loads(json.dumps(old.state_dict())))
    again = _loader(corpus, 2)
    again.load_rank_states(states)
    got = _ids(_take(again, 10))
    slot_states = [w for s in states for w in s["workers"]]
    assert got == _reader_ids(root, 2, 10, slot_states, first=3 % 2)
    # the slots' shares of the rest differ in size, so the first one to finish starts the next
    # epoch while another still reads this one: all of the rest comes within 10 batches
    assert len(set(seen)) == len(seen) and set(range(N)) - set(seen) <= set(got)


def test_images_are_normalised_on_the_device_with_the_models_statistics(corpus):
    root, text = corpus
    views = AugmentConfig()
    batch = _take(_loader(corpus, 0, views=views), 1)[0]
    cfg = _cfg(root)
    reader = ShardReader(list_shards(str(root)), shuffle_block=4)
    raw = BatchLoader(reader, text, batch_size=BATCH, image_size=16, crop=cfg.data.train_crop,
                      needs=frozenset({"image_ids"})).next_batch()
    assert raw["images"].dtype == torch.uint8 and raw["images"].shape == (BATCH, 16, 16, 3)
    assert torch.allclose(batch["images"], normalise(raw["images"], CLIP_MEAN, CLIP_STD), atol=1e-6)
    assert batch["views"].shape == (2 * BATCH, 3, 16, 16)
    other = _take(_loader(corpus, 0, "model.vision.image_mean=[0.5,0.5,0.5]",
                          "model.vision.image_std=[0.5,0.5,0.5]"), 1)[0]
    assert torch.allclose(other["images"], raw["images"].permute(0, 3, 1, 2).float() / 127.5 - 1, atol=1e-6)


def test_training_crops_are_random_and_seeded(corpus):
    a = _take(_loader(corpus, 0), 1)[0]["images"]
    b = _take(_loader(corpus, 0), 1)[0]["images"]
    centre = _take(_loader(corpus, 0, "data.train_crop.scale=[1,1]", "data.train_crop.ratio=[1,1]"), 1)[0]["images"]
    assert torch.equal(a, b) and not torch.allclose(a, centre, atol=1e-3)


def test_broken_data_in_a_worker_raises_in_the_training_process(tmp_path, corpus):
    _, text = corpus
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"{s:05d}.tar")) as w:
            for i in range(20):
                w.write({"__key__": f"{s}{i:04d}", "jpg": truncated_jpeg(), "txt": "item 1", "json": {}})
        (tmp_path / f"{s:05d}_stats.json").write_text(json.dumps({"success": 20}))
    loader = _loader((tmp_path, text), 2, "data.bad_sample_window=10")
    with pytest.raises(BadDataError, match=r"rank 0: 10 of the last 10 samples read were bad .* in \S+0000[01]\.tar"):
        loader.next_batch()
    loader.close()


def test_a_state_saved_before_data_workers_existed_resumes(corpus):
    """A checkpoint of the in-process BatchLoader (its own state, no "workers" list)."""
    root, text = corpus
    cfg = _cfg(root)
    old = make_batches(cfg, text, frozenset({"image_ids"}), 0, 1, 0, 1)
    for _ in range(3):
        old.next_batch()
    whole = _take(_loader(corpus, 1), 5)
    again = _loader(corpus, 1)
    again.load_rank_states([old.state_dict()])
    assert _ids(_take(again, 2)) == _ids(whole[3:])


def test_default_workers_share_the_cpus_among_the_nodes_ranks(monkeypatch):
    import os

    from vlm.data.loader import default_workers

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == cpus - 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus))
    assert default_workers() == 0
