"""The training input pipeline of one rank: data worker processes make batches, the device
normalises them.

Each of a rank's `num_workers` data workers (torch DataLoader processes) owns one slot of the
shard reader (slot = rank x workers + worker, data_pipeline.shards.reader) and a
vlm.data.batches.BatchLoader over it: it reads, decodes, crops and tokenises whole batches
and sends them as uint8, each with its BatchLoader's state after that batch. The DataLoader
hands batches out strictly in turn, so batch n of the rank is the next batch of worker
n mod W: the sequence is a function of the seed alone, and the rank's state is the state of
every worker as of the last batch the training loop *took* (not of what the workers have
prefetched). A resume restarts the workers from those states with the turn where it was,
so it continues exactly; at another worker count or world size, the reader re-splits what
is left of the epoch among the new slots.

In the training process, `next_batch` copies the batch to the device (asynchronously, from
pinned memory on CUDA), turns the uint8 images into floats there, draws the two views of
image–image objectives (vlm.data.augment, seeded by the batch number) and normalises
(vlm.data.pixels.normalise). With `num_workers` 0 the same BatchLoader runs in the training
process (the debugging path; a state saved that way resumes with one worker and back)."""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm.data.config import AugmentConfig
from vlm.data.augment import two_views
from vlm.data.batches import BadDataError, BatchLoader
from vlm.data.pixels import normalise, unit_range

# BatchLoader(worker, num_workers) for this rank; a module-level function or partial when
# the workers are spawned rather than forked (it is pickled then)
MakeBatches = Callable[[int, int], BatchLoader]
_ERRORS = {"BadDataError": BadDataError, "ValueError": ValueError, "FileNotFoundError": FileNotFoundError}


def default_workers() -> int:
    """data.loader_workers when unset: the CPUs this process may run on, shared among the
    node's training processes (LOCAL_WORLD_SIZE, set by torchrun and Ray Train), minus one
    for the training process itself."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, cpus // local - 1)


def _quiet_worker(_: int) -> None:
    """A data worker ignores SIGINT/SIGTERM: the training process handles them (it finishes
    the step and saves, which may still need a batch) and closes the workers after."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        signal.set_wakeup_fd(-1)  # inherited: the parent's stop watcher must not hear our signals
    except ValueError:
        pass


class _Workers(IterableDataset):
    """What each DataLoader worker runs: its slot's BatchLoader, from `states` when given,
    yielding (batch, state after it, worker). DataLoader worker i plays logical worker
    (i + first) mod W, so that the turn continues where the previous run left it."""

    def __init__(self, make: MakeBatches, num_workers: int, first: int, states: list[dict] | None,
                 all_states: list[dict] | None):
        self.make, self.num_workers, self.first = make, num_workers, first
        self.states, self.all_states = states, all_states

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first) % self.num_workers
        try:
            batches = self.make(worker, self.num_workers)
            if self.states is not None:
                batches.load_state_dict(self.states[worker])
            elif self.all_states is not None:
                batches.load_rank_states(self.all_states)
            while True:
                batch = batches.next_batch()
                yield batch, batches.state_dict(), dict(batches.last_bad), worker
        except Exception as e:  # noqa: BLE001 - handed to the training process, which raises it
            yield {"__error__": (type(e).__name__, str(e))}, None, None, worker


class TrainLoader:
    """A rank's batches on `device`, normalised with `mean`/`std`; resumable (module docstring).

    `views` (data.augment) adds "views" [2B, 3, S, S] for image–image objectives. Attributes
    the trainer reads: `last_wait_s` (how long next_batch waited for data), `last_bad` (bad
    samples skipped for the last batch, by reason), `bad_counts` (this rank's since the
    run began) and `taken_ids` (the sample ids of the batches taken, when the batches carry
    them: the trainer empties it every step)."""

    def __init__(self, make: MakeBatches, *, num_workers: int, device: torch.device | str = "cpu",
                 mean: tuple[float, ...], std: tuple[float, ...], views: AugmentConfig | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, prefetch: int = 2):
        self.make, self.num_workers, self.prefetch = make, num_workers, prefetch
        self.device = torch.device(device)
        self.mean, self.std, self.views, self.seed = mean, std, views, seed
        self.rank, self.world_size = rank, world_size
        self.slots = max(1, num_workers)  # reader slots of this rank (0 workers read one, in-process)
        self.states: list[dict | None] = [None] * self.slots
        self._resume: tuple[list[dict] | None, list[dict] | None] = (None, None)
        self.batches = 0
        self.last_wait_s = 0.0
        self.last_bad: Counter[str] = Counter()
        self.taken_ids: list[str] = []  # the batches' "sample_ids" (data.log_sample_ids), until the trainer takes them
        self._iter: Iterator | None = None

    # -- batches ---------------------------------------------------------------------------

    def _start(self) -> Iterator:
        states, all_states = self._resume
        if self.num_workers == 0:
            return iter(_Workers(self.make, 1, 0, states, all_states))
        dataset = _Workers(self.make, self.num_workers, self.batches % self.num_workers, states, all_states)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch,
                            persistent_workers=False, pin_memory=self.device.type == "cuda",
                            worker_init_fn=_quiet_worker)
        return iter(loader)

    def _host_batch(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = self._start()
        batch, state, bad, worker = next(self._iter)
        if "__error__" in batch:
            self.close()
            kind, message = batch["__error__"]
            raise _ERRORS.get(kind, RuntimeError)(message if kind in _ERRORS else f"{kind}: {message}")
        self.states[worker] = state
        self.last_bad = Counter(bad)
        return batch

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch on the device: "images" [B, 3, S, S] float, normalised; the rest as made."""
        t0 = time.perf_counter()
        host = self._host_batch()
        self.last_wait_s = time.perf_counter() - t0
        self.taken_ids.extend(host.pop("sample_ids", ()))
        nb = self.device.type == "cuda"
        batch = {k: v.to(self.device, non_blocking=nb) for k, v in host.items()}
        if self.views is not None:  # drawn on the [0, 1] scale, then normalised like the images
            unit = unit_range(batch["images"])
            g = torch.Generator().manual_seed(hash((self.seed, self.rank, self.batches)) & 0xFFFF_FFFF)
            batch["views"] = normalise(two_views(unit, self.views, g), self.mean, self.std)
        batch["images"] = normalise(batch["images"], self.mean, self.std)
        self.batches += 1
        return batch

    def close(self) -> None:
        """Ends the worker processes (a later next_batch starts them again where they were)."""
        self._iter = None

    # -- state -----------------------------------------------------------------------------

    @property
    def bad_counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for state in self.states:
            total.update((state or {}).get("bad_samples", {}))
        return total

    def state_dict(self) -> dict:
        """{"rank", "world_size", "batches", "num_workers", "workers": every slot's BatchLoader
        state as of the last batch taken}.
        A slot that has not delivered a batch yet saves the state it started from."""
        missing = [w for w, s in enumerate(self.states) if s is None]
        if missing:
            start, all_states = self._resume
            fresh = {w: (start[w] if start is not None else self._fresh_state(w, all_states)) for w in missing}
            self.states = [s if s is not None else fresh[w] for w, s in enumerate(self.states)]
        return {"rank": self.rank, "world_size": self.world_size, "batches": self.batches,
                "num_workers": self.num_workers, "workers": list(self.states)}

    def _fresh_state(self, worker: int, all_states: list[dict] | None) -> dict:
        batches = self.make(worker, self.slots)
        if all_states is not None:
            batches.load_rank_states(all_states)
        return batches.state_dict()

    def load_rank_states(self, rank_states: list[dict]) -> None:
        """Every rank's saved state (state_dict(), or a BatchLoader state saved before data
        workers existed): an exact resume when the world size and worker count are this
        run's, else the reader re-splits what is left (data_pipeline.shards.reader)."""
        self.close()
        slot_states = [s for r in rank_states for s in r.get("workers", [r])]
        layout = {(s["world_size"], s.get("num_workers", 1)) for s in slot_states}
        if layout == {(self.world_size, self.slots)} and len(rank_states) == self.world_size:
            mine = sorted((s for s in slot_states if s["rank"] == self.rank), key=lambda s: s.get("worker", 0))
            self.batches = rank_states[self.rank].get("batches", 0)
            self._resume = (mine, None)
            self.states = list(mine)
        else:
            self.batches = max(r.get("batches", 0) for r in rank_states)
            self._resume = (None, slot_states)
            self.states = [None] * self.slots
