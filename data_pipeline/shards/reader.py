"""The resumable training reader over committed webdataset shards.

Shuffling is two-level and fully determined by (seed, epoch, shard): the shard order is
permuted per epoch and split across *slots* (one slot per rank and data-loader worker:
slot = rank * num_workers + worker), and each shard is read as a stream in blocks of
`shuffle_block` samples that are permuted in memory. Because nothing depends on history,
a slot's state is a few integers (epoch, shard cursor, samples emitted in the shard) and a
resume replays exactly the same sample sequence, reading at most one block again. A
classic shuffle buffer mixes more widely but would have to checkpoint its contents to
resume exactly (OpenCLIP's reader cannot resume mid-epoch at all).

Three ways to read (docs/checkpoints.md has the user's view):
- epochs (default): every sample once per epoch, split by slot;
- resampling (`resample=True`): each slot draws shards with replacement from a stream
  keyed by (seed, slot, draw index); infinite, no epoch boundary;
- a weighted mix of shard sets (`MixedReader`): each next sample's source is drawn from a
  generator keyed by (seed, slot, sample index), so the mix's state is a counter plus its
  sources' states.

Resuming at a different world size (`load_rank_states`, given every old slot's state):
- epochs: the samples no old slot consumed in the epochs they had begun (partly read
  shards continue past their consumed samples) are split among the new slots as a list of
  pending (epoch, shard, skip) units; then normal epochs follow at the new world size.
  Each sample is read at most once per epoch, and the rest of the epoch exactly once.
- resampling: there is no epoch to finish, so every new slot starts a fresh stream under
  the next *generation* of the seed (no old draw is replayed); partly read shards are
  dropped, which does not bias sampling with replacement.
- mix: each source reshards by its own rule; the source draws start a new generation.

A consumer that skips a broken sample (vlm.data.batches.BatchLoader) has still consumed it: the
position counts every sample emitted, so a resume neither reads a skipped sample again
nor misses the one after it.

The shards are read as sample streams by data_pipeline.shards.samples."""
from __future__ import annotations

import bisect
import itertools
import math
import posixpath
import random
from typing import Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from data_pipeline.shards.samples import iter_tar_samples, list_shards


class MixSource(BaseModel):
    """One shard set of a weighted mix: `weight` is relative (they need not sum to 1)."""
    model_config = ConfigDict(extra="forbid")
    shards: str
    weight: float = Field(gt=0, allow_inf_nan=False)


class ReaderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shuffle_block: int = Field(1000, ge=1)
    resample: bool = False  # draw shards with replacement, no epochs
    mix: list[MixSource] = Field(default_factory=list)  # empty = just data.train_shards


def _slot(rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, int]:
    """(rank, worker) -> (slot, number of slots)."""
    if world_size < 1 or num_workers < 1:
        raise ValueError(f"world_size ({world_size}) and num_workers ({num_workers}) must be at least 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is outside 0..{num_workers - 1}")
    return rank * num_workers + worker, world_size * num_workers


def _layout(world_size: int, num_workers: int) -> str:
    return f"{world_size} ranks" + (f" x {num_workers} workers" if num_workers > 1 else "")


def _states_by_slot(states: list[dict], kind: str) -> tuple[list[dict], int, int]:
    """Every old slot's state -> (states ordered by slot, old world size, old num_workers).
    Refuses a list that is not exactly one state per slot of one layout."""
    if not states:
        raise ValueError("no reader states given: pass every old rank's reader state")
    kinds = {s.get("kind", "shards") for s in states}
    if kinds != {kind}:
        raise ValueError(f"reader states were saved by a {'/'.join(sorted(kinds))} reader, "
                         f"this run uses a {kind} reader (data.reader.mix changed?)")
    layouts = {(s["world_size"], s.get("num_workers", 1)) for s in states}
    if len(layouts) != 1:
        raise ValueError(f"reader states come from different layouts: {sorted(layouts)}")
    (world_size, num_workers), = layouts
    slots: dict[int, dict] = {}
    for s in states:
        slot, _ = _slot(s["rank"], world_size, s.get("worker", 0), num_workers)
        if slot in slots:
            raise ValueError(f"two reader states for rank {s['rank']} worker {s.get('worker', 0)}")
        slots[slot] = s
    missing = [i for i in range(world_size * num_workers) if i not in slots]
    if missing:
        raise ValueError(f"reader states of a run on {_layout(world_size, num_workers)} lack "
                         f"{len(missing)} slot(s) (rank*num_workers+worker = {missing[:8]}): "
                         f"pass every old rank's state")
    return [slots[i] for i in range(len(slots))], world_size, num_workers


class ShardReader:
    """Infinite, deterministic, resumable sample stream for one slot (rank, worker).

    Samples carry "__epoch__" (epoch mode) or "__draw__" (resampling) besides the shard's
    members."""

    kind = "shards"

    def __init__(self, shards: list[str], *, rank: int = 0, world_size: int = 1, seed: int | str = 0,
                 shuffle_block: int = 1000, worker: int = 0, num_workers: int = 1, resample: bool = False):
        self.slot, self.slots = _slot(rank, world_size, worker, num_workers)
        if not shards:
            raise ValueError("no shards to read")
        if not resample and len(shards) < self.slots:
            raise ValueError(f"{len(shards)} shard(s) cannot feed {_layout(world_size, num_workers)}: write "
                             f"smaller shards (data.ingest.shard_size), use fewer workers or data.reader.resample")
        self.shards = list(shards)
        self.rank, self.world_size, self.worker, self.num_workers = rank, world_size, worker, num_workers
        self.seed, self.shuffle_block, self.resample = seed, shuffle_block, resample
        self._reset()

    def _reset(self) -> None:
        self.epoch = 0
        self.shard_cursor = 0   # index into this slot's shard list for the epoch
        self.sample_cursor = 0  # samples already emitted from the current shard or pending unit
        self.pending: list[list[int]] = []  # [epoch, shard index, skip]: left over from a resharded resume
        self.draw = 0           # resampling: shards drawn so far
        self.generation = 0     # resampling: bumped by every resume at a new world size

    # -- the order, a pure function of (seed, epoch / draw) ------------------------------

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        random.Random(f"{self.seed}/shards/{epoch}").shuffle(order)
        return order

    def _slot_shards(self, epoch: int, slot: int | None = None, slots: int | None = None) -> list[int]:
        slot = self.slot if slot is None else slot
        return self._epoch_order(epoch)[slot::slots or self.slots]

    def _shard_samples(self, url: str, key) -> Iterator[dict]:
        block: list[dict] = []
        block_index = 0

        def flush():
            random.Random(f"{self.seed}/{key}/{url}/{block_index}").shuffle(block)
            return block

        for sample in iter_tar_samples(url):
            block.append(sample)
            if len(block) == self.shuffle_block:
                yield from flush()
                block, block_index = [], block_index + 1
        if block:
            yield from flush()

    def _emit(self, index: int, key, start: int) -> Iterator[dict]:
        """Shard `index` read under shuffle key `key`, from its `start`-th sample on."""
        for i, sample in enumerate(self._shard_samples(self.shards[index], key)):
            if i >= start:
                self.sample_cursor += 1
                yield sample

    # -- iteration ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        return self._resampled() if self.resample else self._epochs()

    def _epochs(self) -> Iterator[dict]:
        while True:
            while self.pending:
                epoch, index, skip = self.pending[0]
                for sample in self._emit(index, epoch, skip + self.sample_cursor):
                    yield {**sample, "__epoch__": epoch}
                self.pending.pop(0)
                self.sample_cursor = 0
            mine = self._slot_shards(self.epoch)
            whole, emitted = self.shard_cursor == 0 == self.sample_cursor, 0
            while self.shard_cursor < len(mine):
                for sample in self._emit(mine[self.shard_cursor], self.epoch, self.sample_cursor):
                    emitted += 1
                    yield {**sample, "__epoch__": self.epoch}
                self.shard_cursor += 1
                self.sample_cursor = 0
            if whole and not emitted:  # else this slot would loop forever without yielding
                raise ValueError(f"rank {self.rank} worker {self.worker}: its shards of epoch {self.epoch} hold "
                                 f"no samples ({', '.join(self.shards[i] for i in mine)})")
            self.epoch += 1
            self.shard_cursor = 0

    def _resampled(self) -> Iterator[dict]:
        empty = 0
        while True:
            rng = random.Random(f"{self.seed}/resample/{self.generation}/{self.slot}/{self.draw}")
            before = self.sample_cursor
            for sample in self._emit(rng.randrange(len(self.shards)), f"r{self.generation}.{self.draw}", before):
                yield {**sample, "__draw__": self.draw}
            empty = empty + 1 if self.sample_cursor == before == 0 else 0
            if empty > 100 + 10 * len(self.shards):
                raise ValueError(f"rank {self.rank} worker {self.worker}: {empty} shards drawn in a row held no "
                                 f"samples; are the shards under {posixpath.dirname(self.shards[0])} empty?")
            self.draw += 1
            self.sample_cursor = 0

    # -- state --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"kind": self.kind, "epoch": self.epoch, "shard_cursor": self.shard_cursor,
                "sample_cursor": self.sample_cursor, "pending": [list(u) for u in self.pending],
                "resample": self.resample, "draw": self.draw, "generation": self.generation,
                "num_shards": len(self.shards), "rank": self.rank, "world_size": self.world_size,
                "worker": self.worker, "num_workers": self.num_workers}

    def _check_compatible(self, state: dict) -> None:
        if state.get("kind", "shards") != self.kind:
            raise ValueError(f"reader state was saved by a {state['kind']} reader (data.reader.mix), "
                             f"this run reads one shard set")
        if state.get("resample", False) != self.resample:
            raise ValueError(f"reader state was saved with resample={state.get('resample', False)}, this run has "
                             f"data.reader.resample={self.resample}")
        if state["num_shards"] != len(self.shards):
            raise ValueError(f"reader state was saved for {state['num_shards']} shards, this run has "
                             f"{len(self.shards)}: the shard set changed")

    def load_state_dict(self, state: dict) -> None:
        """Exact resume of this slot (same world size and workers)."""
        if state.get("kind", "shards") != self.kind:
            self._check_compatible(state)
        saved = (state["num_shards"], state["world_size"], state.get("num_workers", 1))
        if saved != (len(self.shards), self.world_size, self.num_workers):
            raise ValueError(
                f"reader state was saved for {state['num_shards']} shards on "
                f"{_layout(state['world_size'], state.get('num_workers', 1))}, this run has {len(self.shards)} "
                f"shards on {_layout(self.world_size, self.num_workers)} (load_rank_states reshards)")
        self._check_compatible(state)
        if (state["rank"], state.get("worker", 0)) != (self.rank, self.worker):
            raise ValueError(f"reader state belongs to rank {state['rank']} worker {state.get('worker', 0)}, "
                             f"this reader is rank {self.rank} worker {self.worker}")
        self._reset()
        self.epoch, self.shard_cursor = state["epoch"], state["shard_cursor"]
        self.sample_cursor = state["sample_cursor"]
        self.pending = [list(u) for u in state.get("pending", [])]
        self.draw, self.generation = state.get("draw", 0), state.get("generation", 0)

    def load_rank_states(self, states: list[dict]) -> None:
        """Resume from every old slot's state, at any world size (module docstring)."""
        ordered, world_size, num_workers = _states_by_slot(states, self.kind)
        for s in ordered:
            self._check_compatible(s)
        if (world_size, num_workers) == (self.world_size, self.num_workers):
            self.load_state_dict(ordered[self.slot])
            return
        self._reset()
        if self.resample:
            self.generation = max(s.get("generation", 0) for s in ordered) + 1
            return
        units, self.epoch = self._unread_units(ordered)
        self.pending = units[self.slot::self.slots]

    def _unread_units(self, ordered: list[dict]) -> tuple[list[list[int]], int]:
        """Old slots' states -> ([epoch, shard index, skip] not yet read, the first epoch to
        generate normally), in epoch order then shard order within the epoch."""
        last = max(s["epoch"] for s in ordered)
        units: list[tuple[int, int, int]] = []
        for old_slot, s in enumerate(ordered):
            pending = [list(u) for u in s.get("pending", [])]
            cursor, skip = s["shard_cursor"], s["sample_cursor"]
            if pending:
                pending[0][2] += s["sample_cursor"]
                cursor = skip = 0
            units.extend(tuple(u) for u in pending)
            for epoch in range(s["epoch"], last + 1):
                mine = self._slot_shards(epoch, old_slot, len(ordered))
                first = cursor if epoch == s["epoch"] else 0
                units.extend((epoch, index, skip if (epoch == s["epoch"] and j == first) else 0)
                             for j, index in enumerate(mine[first:], start=first))
        position = {e: {index: p for p, index in enumerate(self._epoch_order(e))} for e in {u[0] for u in units}}
        units.sort(key=lambda u: (u[0], position[u[0]][u[1]]))
        tail = [u for u in units if u[0] == last]
        if len(tail) == len(self.shards) and not any(u[2] for u in tail):
            return [list(u) for u in units if u[0] != last], last  # nobody began it: read it normally
        return [list(u) for u in units], last + 1


class MixedReader:
    """A weighted mix of shard sets: each next sample comes from source j with probability
    weights[j] / sum(weights), drawn from a generator keyed by (seed, generation, slot,
    sample index), so the mix resumes exactly from a counter and its sources' states.

    The sources must be readers of the same slot. Samples carry "__source__" (j).
    Changing the weights between runs is allowed (the draws from there on follow the new
    weights); changing the number of sources is not."""

    kind = "mix"

    def __init__(self, readers: list[ShardReader], weights: list[float], *, seed: int | str = 0):
        if not readers:
            raise ValueError("a mix needs at least one shard set")
        if len(weights) != len(readers):
            raise ValueError(f"a mix of {len(readers)} shard sets needs {len(readers)} weights, got {len(weights)}")
        for j, w in enumerate(weights):
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise ValueError(f"mix weight {j} is {w!r}: weights must be positive finite numbers")
        layouts = {(r.rank, r.world_size, r.worker, r.num_workers) for r in readers}
        if len(layouts) != 1:
            raise ValueError(f"the mix's readers must all read the same slot, got {sorted(layouts)}")
        self.readers, self.weights, self.seed = list(readers), [float(w) for w in weights], seed
        first = readers[0]
        self.rank, self.world_size, self.worker, self.num_workers = (first.rank, first.world_size, first.worker,
                                                                     first.num_workers)
        self.slot, self.slots = first.slot, first.slots
        self._cumulative = list(itertools.accumulate(self.weights))
        self.index = 0       # samples emitted
        self.generation = 0  # bumped by every resume at a new world size

    def _source(self, index: int) -> int:
        u = random.Random(f"{self.seed}/mix/{self.generation}/{self.slot}/{index}").random()
        return min(bisect.bisect_right(self._cumulative, u * self._cumulative[-1]), len(self.readers) - 1)

    def __iter__(self) -> Iterator[dict]:
        streams = [iter(r) for r in self.readers]
        while True:
            j = self._source(self.index)
            sample = next(streams[j])
            self.index += 1
            yield {**sample, "__source__": j}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "index": self.index, "generation": self.generation, "weights": self.weights,
                "sources": [r.state_dict() for r in self.readers], "rank": self.rank,
                "world_size": self.world_size, "worker": self.worker, "num_workers": self.num_workers}

    def _check_compatible(self, state: dict) -> None:
        if state.get("kind", "shards") != self.kind:
            raise ValueError(f"reader state was saved by a reader of one shard set, this run mixes "
                             f"{len(self.readers)} (data.reader.mix)")
        if len(state["sources"]) != len(self.readers):
            raise ValueError(f"reader state was saved for a mix of {len(state['sources'])} shard sets, this run "
                             f"mixes {len(self.readers)}")

    def load_state_dict(self, state: dict) -> None:
        self._check_compatible(state)
        for reader, source in zip(self.readers, state["sources"]):
            reader.load_state_dict(source)
        self.index, self.generation = state["index"], state.get("generation", 0)

    def load_rank_states(self, states: list[dict]) -> None:
        """Resume from every old slot's state, at any world size (module docstring)."""
        ordered, world_size, num_workers = _states_by_slot(states, self.kind)
        for s in ordered:
            self._check_compatible(s)
        if (world_size, num_workers) == (self.world_size, self.num_workers):
            self.load_state_dict(ordered[self.slot])
            return
        for j, reader in enumerate(self.readers):
            reader.load_rank_states([s["sources"][j] for s in ordered])
        self.index = 0
        self.generation = max(s.get("generation", 0) for s in ordered) + 1


def build_reader(cfg: ReaderConfig, train_shards: str, *, rank: int, world_size: int, seed: int,
                 worker: int = 0, num_workers: int = 1,
                 expand: Callable[[str], str] | None = None) -> ShardReader | MixedReader:
    """The training reader `cfg` describes for one slot: `train_shards` alone, or the mix
    (`train_shards` is then unused). `expand` resolves templates such as {run_dir} in the
    mix's paths (RunConfig.path)."""
    common = dict(rank=rank, world_size=world_size, worker=worker, num_workers=num_workers,
                  shuffle_block=cfg.shuffle_block, resample=cfg.resample)
    if not cfg.mix:
        return ShardReader(list_shards(train_shards), seed=seed, **common)
    readers = []
    for j, source in enumerate(cfg.mix):
        path = expand(source.shards) if expand else source.shards
        try:
            shards = list_shards(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.reader.mix[{j}].shards: {e}") from None
        try:
            readers.append(ShardReader(shards, seed=f"{seed}/{j}", **common))
        except ValueError as e:
            raise ValueError(f"data.reader.mix[{j}] ({path}): {e}") from None
    return MixedReader(readers, [s.weight for s in cfg.mix], seed=seed)
