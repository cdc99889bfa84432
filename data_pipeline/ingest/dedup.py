"""Exact duplicates across one ingest run (the run-wide registry, a shard's marking) and live progress.

One registry per run holds it (``runners``): on Ray an actor, created under a name after
the first shard tasks are submitted (``RegistryRef``; an actor created first took one of
the workers Ray starts with the node, and a shard task then waited ~1.5 s for a new one);
on local processes an object in a ``multiprocessing`` manager. Shard tasks claim the
content hashes of their successful samples in one call per shard; the first shard to
claim a hash owns it, later ones get the owner's key back and drop their copy as
``duplicate``. A shard that claims again (a retry of its task, ``--retry-failed``)
sends its whole final set and takes its own entries over, so a retried attempt never
loses to its earlier self. A restarted driver reloads the owners from the committed
shards' status tables.

Hashes are kept as 16-byte prefixes of the sha256 (collision odds ~2^-64 at 2^32 images).
"""
from __future__ import annotations

import threading
import time


def shard_of(key: str) -> int:
    return int(key[:5])


class DedupRegistry:
    """hash -> owning key; plain Python so it runs in-process (tests), in a manager process
    or as a Ray actor."""

    def __init__(self):
        self._owner: dict[bytes, str] = {}
        self._progress: dict[int, tuple[int, int]] = {}
        self._finished: set[int] = set()

    # ---------------------------------------------------------------- duplicates

    def preload(self, entries: list[tuple[bytes, str]]) -> int:
        """Owners from committed shards (first one wins, as in the run that wrote them)."""
        for digest, key in entries:
            self._owner.setdefault(digest[:16], key)
        return len(self._owner)

    def claim(self, shard_id: int, entries: list[tuple[bytes, str]]) -> list[str]:
        """``entries``: every (sha256, key) a shard keeps, already unique within the shard.
        Returns each entry's owner key: its own key when it is kept."""
        owners = []
        for digest, key in entries:
            digest = digest[:16]
            owner = self._owner.get(digest)
            if owner is None or shard_of(owner) == shard_id:
                self._owner[digest] = owner = key
            owners.append(owner)
        return owners

    def size(self) -> int:
        return len(self._owner)

    # ---------------------------------------------------------------- progress

    def progress(self, shard_id: int, done: int, failed: int) -> None:
        """Cumulative counts of a running shard task (a late message after finish is ignored)."""
        if shard_id not in self._finished:
            self._progress[shard_id] = (done, failed)

    def finish(self, shard_id: int) -> None:
        self._finished.add(shard_id)
        self._progress.pop(shard_id, None)

    def running_totals(self) -> tuple[int, int]:
        """(rows done, rows failed) over the shard tasks still running."""
        return sum(d for d, _ in self._progress.values()), sum(f for _, f in self._progress.values())


class ProgressReporter:
    """Sends a shard task's cumulative counts to the registry at most every ``period_s``."""

    def __init__(self, registry, shard_id: int, period_s: float = 0.5):
        self.registry, self.shard_id, self.period_s = registry, shard_id, period_s
        self.done = self.failed = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, ok: bool) -> None:
        """Thread-safe: the fetch threads of a shard call it as each row ends."""
        with self._lock:
            self.done += 1
            self.failed += not ok
            now = time.monotonic()
            if self.registry is None or now - self._last < self.period_s:
                return
            self._last = now
            counts = (self.done, self.failed)
        _call(self.registry.progress, self.shard_id, *counts)


class RegistryRef:
    """A run's registry actor by name, for shard tasks submitted before it exists; a task
    looks it up (``resolve``) when it starts, by which time the driver has created it."""

    def __init__(self, name: str):
        self.name = name

    def resolve(self, timeout_s: float = 600.0):
        """The actor handle; waits up to ``timeout_s`` for the driver to create it (it
        reads the table's next shards before that, which on an object store can be slow)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get_actor(self.name)
            except ValueError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ingest: the run's registry actor {self.name!r} never appeared "
                                       f"(did the driver die?)") from None
                time.sleep(0.02)


def _call(method, *args):
    """Call a registry method on a Ray actor handle (fire and forget) or a plain object."""
    remote = getattr(method, "remote", None)
    return remote(*args) if remote is not None else method(*args)


def claim(registry, shard_id: int, entries: list[tuple[bytes, str]]) -> list[str]:
    if registry is None:
        return [key for _, key in entries]
    remote = getattr(registry.claim, "remote", None)
    if remote is None:
        return registry.claim(shard_id, entries)
    import ray

    return ray.get(remote(shard_id, entries))


def mark_duplicates(outcomes: list, registry, shard_id: int) -> None:
    """Exact duplicates by content hash among a shard's ``Outcome``s: the first row of the
    shard with a hash, then the first shard of the run to claim it, keeps the image."""
    first: dict[bytes, str] = {}
    entries = []
    for out in outcomes:
        if not out.ok or out.sha256 is None:
            continue
        digest = bytes.fromhex(out.sha256)
        if digest in first:
            out.reject("duplicate", f"same image as {first[digest]}")
            continue
        first[digest] = out.key
        entries.append((digest, out.key))
    by_key = {out.key: out for out in outcomes}
    for (_, key), owner in zip(entries, claim(registry, shard_id, entries)):
        if owner != key:
            by_key[key].reject("duplicate", f"same image as {owner}")
