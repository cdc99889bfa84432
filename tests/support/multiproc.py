"""Runs a function on N gloo ranks in spawned processes (on 127.0.0.1) and returns what
each rank returned, for the tests that compare a distributed computation with one process.

`fn(rank)` must be a module-level function (it is pickled into the children) and return
something picklable (numpy arrays rather than tensors: no shared memory outlives a
process). A rank that raises fails the calling test with its traceback."""
from __future__ import annotations

import os
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp
from support.ports import free_port


def _entry(fn, rank: int, world: int, port: int, queue) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, fn(rank)))
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, traceback.format_exc()))


class RankFailed(AssertionError):
    pass


def run_ranks(fn, world: int, *, timeout: float = 120) -> list:
    """[fn(0), ..., fn(world - 1)], each computed in its own gloo rank."""
    port = free_port()  # a loopback port nobody listens on
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=timeout) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank in range(world):
        if isinstance(got[rank], str) and got[rank].startswith("Traceback"):
            raise RankFailed(f"rank {rank} failed:\n{got[rank]}")
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        raise RankFailed(f"rank exit codes {codes}")
    return [got[r] for r in range(world)]
