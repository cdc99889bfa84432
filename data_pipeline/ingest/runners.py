"""Where an ingest run's shard tasks execute: the caller's Ray (``RayRunner``) or a pool of
local processes without Ray (``LocalRunner``), behind the few calls the driver makes.

Why a local pool: on one machine a private Ray costs 6-8 CPU-seconds to start and stop
(the GCS, the raylet, agents and monitors, most of them Python importing Ray), as much as
ingesting ~1,000 photos; on a 2-core machine that was ~4 s of a ~14 s run (docs/data.md).
A ``concurrent.futures.ProcessPoolExecutor`` whose workers fork from a forkserver that has
already imported the ingest code starts in well under a second. On a cluster, Ray is what
spreads the shards over the nodes, so ``--ray-address`` keeps using it.

Both runners give a shard task the run's ``DedupRegistry``: a named Ray actor (looked up
through a ``RegistryRef``), or an object served by a ``multiprocessing`` manager process
(its proxies are plain callables, which ``dedup`` accepts as it accepts an in-process
registry). Both retry a task ``task_retries`` times after a transient error or the loss of
its worker process, and never after anything else (it would fail again the same way).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.managers import BaseManager
from multiprocessing import forkserver
from typing import Any, Callable

from data_pipeline.ingest.dedup import DedupRegistry, RegistryRef

# What the forkserver imports once, so that every worker it forks starts with it loaded.
# pandas: pyarrow imports it (when installed) at the first array it builds, 0.23 s of CPU
# that every worker would otherwise pay at the end of its first shard. (A module that
# is not installed is skipped.)
_PRELOAD = ["data_pipeline.ingest.shard", "data_pipeline.ingest.runners", "pandas"]


def prestart_local() -> None:
    """Starts the forkserver of ``LocalRunner`` now, so that it imports the ingest code
    while the caller is still checking its inputs (~0.3 s of a run on 2 cores). Cheap to
    import and to call: the forkserver is a new process; it exits with this one."""
    mp.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    forkserver.ensure_running()


def transient_exceptions() -> tuple[type[BaseException], ...]:
    """The exceptions of a shard task worth another attempt (network and storage hiccups).
    Anything else (PermissionError, a full disk, a bad schema, a ValueError of bad input)
    would fail again the same way, after fetching every row of the shard again."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as boto

        types += [boto.ConnectionError, boto.HTTPClientError]
    with contextlib.suppress(ImportError):
        import aiohttp

        types.append(aiohttp.ClientError)
    return tuple(types)


class RunRegistry(DedupRegistry):
    """The run's registry, which can also reload the owners of committed shards' images."""

    def load_committed(self, output_dir: str, shard_ids: list[int]) -> int:
        import fsspec
        import pyarrow.parquet as pq

        from data_pipeline.shards.format import shard_paths

        fs, root = fsspec.core.url_to_fs(output_dir)
        for sid in sorted(shard_ids):
            with fs.open(shard_paths(root, sid)["parquet"], "rb") as f:
                table = pq.read_table(f, columns=["key", "status", "sha256"])
            entries = [(bytes.fromhex(r["sha256"]), r["key"]) for r in table.to_pylist()
                       if r["status"] == "success" and r["sha256"]]
            self.preload(entries)
        return self.size()


class RayRunner:
    """Shard tasks on the caller's Ray (one CPU each); the registry is a named actor created
    on first use (``registry``), after the first tasks: created first, it took one of the
    workers Ray starts with the node and a shard task waited ~1.5 s for a new one."""

    def __init__(self, ray, task_retries: int):
        self.ray = ray
        self.concurrency = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.task_registry = RegistryRef(f"ingest-registry-{uuid.uuid4().hex}")
        self._actor = None
        from data_pipeline.ingest.shard import ingest_shard

        self._task = ray.remote(num_cpus=1, max_retries=task_retries,
                                retry_exceptions=list(transient_exceptions()))(ingest_shard)

    def registry(self):
        if self._actor is None:
            self._actor = self.ray.remote(RunRegistry).options(num_cpus=0, name=self.task_registry.name).remote()
        return self._actor

    def call(self, method: str, *args) -> Any:
        return self.ray.get(getattr(self.registry(), method).remote(*args))

    def notify(self, method: str, *args) -> None:
        getattr(self.registry(), method).remote(*args)

    def submit(self, *args, **kwargs):
        return self._task.remote(*args, **kwargs)

    def wait(self, handles, timeout: float) -> list:
        done, _ = self.ray.wait(list(handles), num_returns=1, timeout=timeout)
        return done

    def result(self, handle) -> dict:
        return self.ray.get(handle)

    def failure(self, error: BaseException) -> tuple[BaseException, bool]:
        """(the task's own exception, whether Ray retried it): Ray's RayTaskError carries the
        task's exception as ``cause``, retried only when transient; a lost worker always is."""
        cause = getattr(error, "cause", None) or error
        return cause, cause is error or isinstance(cause, transient_exceptions())

    def cancel(self, handles) -> None:
        for h in handles:
            self.ray.cancel(h)

    def close(self, ok: bool) -> None:
        if self._actor is not None:
            self.ray.kill(self._actor)


class _Manager(BaseManager):
    """Serves the run's registry to the local shard processes."""


_Manager.register("Registry", RunRegistry)


def _worker_init(driver_pid: int) -> None:
    """A local shard process (or the registry's manager): leaves Ctrl-C to the driver, which
    stops the pool, and exits within a second or two of the driver's death (a SIGKILLed
    driver cannot stop it): when the driver's pid is gone, or when its own parent (the
    forkserver, which exits with the driver) changes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(driver_pid, 0)
            except OSError:  # gone, or the pid now belongs to someone else's process
                os._exit(1)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="driver-watch", daemon=True).start()


@dataclass(eq=False)
class _Task:
    """One shard task of a LocalRunner: its arguments, its current attempt and how many ran."""

    args: tuple
    kwargs: dict
    future: Future | None = None
    pool: ProcessPoolExecutor | None = field(default=None, repr=False)
    attempts: int = 0


class LocalRunner:
    """Shard tasks (``task``, by default ``ingest_shard``) on ``processes`` local processes,
    no Ray: a ProcessPoolExecutor forking from a forkserver that preloaded the ingest code,
    and a manager process holding the run's registry. A task that raises a transient error is submitted again, up to
    ``task_retries`` times; when a worker dies (OOM killer, a segfault in a decoder) the
    pool is replaced and every task it held is submitted again, counted as an attempt."""

    def __init__(self, processes: int, task_retries: int, task: Callable[..., dict] | None = None):
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        if task is None:
            from data_pipeline.ingest.shard import ingest_shard as task
        self.concurrency = processes
        self.retries = task_retries
        self._task = task  # a module-level function (it is pickled by name)
        prestart_local()
        self._ctx = mp.get_context("forkserver")
        self._manager = _Manager(ctx=self._ctx)
        self._manager.start(_worker_init, (os.getpid(),))
        self.task_registry = self._registry = self._manager.Registry()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.concurrency, mp_context=self._ctx, initializer=_worker_init,
                                   initargs=(os.getpid(),))

    def registry(self):
        return self._registry

    def call(self, method: str, *args) -> Any:
        return getattr(self._registry, method)(*args)

    notify = call

    def submit(self, *args, **kwargs) -> _Task:
        task = _Task(args, kwargs)
        self._start(task)
        return task

    def _start(self, task: _Task) -> None:
        task.attempts += 1
        task.pool, task.future = self._pool, self._pool.submit(self._task, *task.args, **task.kwargs)

    def wait(self, handles, timeout: float) -> list[_Task]:
        """The tasks among ``handles`` that are finished for good (succeeded, or failed with
        no attempt left); failed attempts are started again here."""
        deadline = time.monotonic() + timeout
        while True:
            pending = {t.future: t for t in handles}
            done, _ = wait_futures(list(pending), timeout=max(0.0, deadline - time.monotonic()),
                                   return_when=FIRST_COMPLETED)
            final = [pending[f] for f in done if not self._retry(pending[f])]
            if final or not done or time.monotonic() >= deadline:
                return final

    def _retry(self, task: _Task) -> bool:
        """Whether a finished attempt of ``task`` was started again."""
        error = task.future.exception()
        if error is None:
            return False
        if isinstance(error, BrokenProcessPool) and task.pool is self._pool:
            self._replace_pool()  # the first of the broken pool's tasks seen here
        if task.attempts > self.retries or not isinstance(error, (BrokenProcessPool, *transient_exceptions())):
            return False
        self._start(task)
        return True

    def _replace_pool(self) -> None:
        """A worker died: the pool is broken and every attempt in it failed. A new pool
        takes them (``wait`` restarts each as it sees it fail)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()

    def result(self, task: _Task) -> dict:
        return task.future.result()

    def failure(self, error: BaseException) -> tuple[BaseException, bool]:
        return error, isinstance(error, (BrokenProcessPool, *transient_exceptions()))

    def cancel(self, handles) -> None:
        for t in handles:
            t.future.cancel()

    def close(self, ok: bool) -> None:
        """Waits for the workers after a run that finished; otherwise (an error, Ctrl-C)
        stops them at once: a shard they leave unfinished has no committed files, and the
        next run does it again."""
        if ok:
            self._pool.shutdown(wait=True)
        else:
            processes = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for p in processes:  # ProcessPoolExecutor has no public terminate before Python 3.14
                with contextlib.suppress(Exception):
                    p.terminate()
            for p in processes:
                p.join(timeout=5)
        self._manager.shutdown()
