"""The resumable training reader over committed webdataset shards.

Shuffling is two-level and fully determined by (seed, epoch, shard): the shard order is
permuted per epoch and split across ranks, and each shard is read as a stream in blocks of
`shuffle_block` samples that are permuted in memory. Because nothing depends on history,
the reader's state is three integers per rank (epoch, shard cursor, samples emitted in the
shard) and a resume replays exactly the same sample sequence, reading at most one block
again. A classic shuffle buffer mixes more widely but would have to checkpoint its
contents to resume exactly (OpenCLIP's reader cannot resume mid-epoch at all).

Tar members are grouped by key with the standard library's streaming tarfile rather than
webdataset's internal iterators, so the reader does not depend on another library's
private layout."""
from __future__ import annotations

import json
import posixpath
import random
import tarfile
from typing import Any, Iterator

import fsspec
from pydantic import BaseModel, ConfigDict, Field


class ReaderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shuffle_block: int = Field(1000, ge=1)


def list_shards(path: str) -> list[str]:
    """Committed shards under `path` (a tar counts once its `_stats.json` exists), sorted."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise FileNotFoundError(f"shard directory not found: {path}")
    names = set(posixpath.basename(p) for p in fs.ls(root, detail=False))
    protocol = path.split("://", 1)[0] + "://" if "://" in path else ""
    shards = []
    for name in sorted(names):
        if name.endswith(".tar") and name[:-4] + "_stats.json" in names:
            shards.append(protocol + posixpath.join(root, name))
    if not shards:
        raise FileNotFoundError(f"no committed shards (*.tar with *_stats.json) in {path}")
    return shards


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Streams one shard as samples {"__key__": key, ext: bytes, ...}; json/txt decoded."""
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            key, _, ext = base.partition(".")
            data = tar.extractfile(member).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__shard__": url}
            if ext == "json":
                current["json"] = json.loads(data)
            elif ext == "txt":
                current["txt"] = data.decode("utf-8")
            else:
                current[ext] = data
        if current is not None:
            yield current


class ShardReader:
    """Infinite, deterministic, resumable sample stream for one rank."""

    def __init__(self, shards: list[str], *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_block: int = 1000):
        if len(shards) < world_size:
            raise ValueError(f"{len(shards)} shard(s) cannot feed {world_size} ranks: "
                             f"write smaller shards (data.ingest.shard_size) or use fewer workers")
        self.shards = list(shards)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_block = shuffle_block
        self.epoch = 0
        self.shard_cursor = 0   # index into this rank's shard list for the epoch
        self.sample_cursor = 0  # samples already emitted from the current shard

    def _rank_shards(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(f"{self.seed}/shards/{epoch}").shuffle(order)
        return order[self.rank::self.world_size]

    def _shard_samples(self, url: str, epoch: int) -> Iterator[dict]:
        block: list[dict] = []
        block_index = 0

        def flush():
            random.Random(f"{self.seed}/{epoch}/{url}/{block_index}").shuffle(block)
            return block

        for sample in iter_tar_samples(url):
            block.append(sample)
            if len(block) == self.shuffle_block:
                yield from flush()
                block, block_index = [], block_index + 1
        if block:
            yield from flush()

    def __iter__(self) -> Iterator[dict]:
        while True:
            shards = self._rank_shards(self.epoch)
            while self.shard_cursor < len(shards):
                skip = self.sample_cursor
                for i, sample in enumerate(self._shard_samples(shards[self.shard_cursor], self.epoch)):
                    if i < skip:
                        continue
                    self.sample_cursor += 1
                    yield sample
                self.shard_cursor += 1
                self.sample_cursor = 0
            self.epoch += 1
            self.shard_cursor = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_cursor": self.shard_cursor,
                "sample_cursor": self.sample_cursor, "num_shards": len(self.shards),
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_shards"], state["world_size"]) != (len(self.shards), self.world_size):
            raise ValueError(
                f"reader state was saved for {state['num_shards']} shards on {state['world_size']} "
                f"ranks, this run has {len(self.shards)} shards on {self.world_size} ranks")
        self.epoch = state["epoch"]
        self.shard_cursor = state["shard_cursor"]
        self.sample_cursor = state["sample_cursor"]
