"""Stopping a run on SIGTERM or SIGINT: the handlers, the grace-period watcher and FORCED_EXIT;
and the end of a finished rank's process (leave_process)."""
from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

# exit status when a second signal, or the end of train.stop_grace_s, ends a run before its
# save (docs/checkpoints.md, "Stopping and restarts"); a clean stop exits with 128 + signum
FORCED_EXIT = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def watch_grace(wakeup: int, done: threading.Event, grace: float, rank: int) -> None:
    """On a thread: after a first signal, waits `grace` seconds for the save; a second
    signal or the end of the grace period exits at once (FORCED_EXIT). It learns of signals
    from the wakeup fd, written by the interpreter's C-level handler the moment one
    arrives: the Python handler waits until the main thread leaves the C call it is in (a
    step, a collective), which may be what hangs."""
    received, deadline = b"", None
    try:
        while not done.is_set():
            if select.select([wakeup], [], [], 0.2)[0]:
                # the fd hears every signal with a Python handler (SIGCHLD from the data
                # workers too): only the stop signals count
                received += bytes(b for b in os.read(wakeup, 64) if b in STOP_SIGNALS)
            if received and deadline is None:
                deadline = time.monotonic() + grace
            late = deadline is not None and time.monotonic() > deadline
            if (len(received) > 1 or late) and not done.is_set():
                why = (f"{signal.Signals(received[1]).name} again" if len(received) > 1 else
                       f"no checkpoint within train.stop_grace_s={grace:g}s")
                print(f"rank {rank}: {why}: exiting now, without a checkpoint at this step "
                      f"(status {FORCED_EXIT})", flush=True)
                os._exit(FORCED_EXIT)
    finally:
        os.close(wakeup)


class StopSignals:
    """SIGTERM and SIGINT handled by `handler` (which only sets flags) while a run steps,
    with watch_grace on a thread. Only in the main thread: inside a Ray Train worker (a
    thread) the driver handles signals, and install() does nothing."""

    def __init__(self, handler: Callable, grace: float, rank: int):
        self.handler, self.grace, self.rank = handler, grace, rank
        self.previous: dict = {}
        self.done, self.pipe, self.old_wakeup = threading.Event(), None, -1

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handler) for s in STOP_SIGNALS}
            self.pipe = os.pipe()
            os.set_blocking(self.pipe[1], False)
            self.old_wakeup = signal.set_wakeup_fd(self.pipe[1], warn_on_full_buffer=False)
            threading.Thread(target=watch_grace, args=(self.pipe[0], self.done, self.grace, self.rank),
                             name="stop-grace", daemon=True).start()
        return self

    def release(self) -> None:
        """Ends the watcher and puts back the previous handlers and wakeup fd."""
        self.done.set()
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.pipe is not None:
            signal.set_wakeup_fd(self.old_wakeup)
            os.close(self.pipe[1])  # the read end stays open for the watcher, which ends within 0.2 s


def leave_process(status: int) -> None:
    """The end of a finished rank, whose checkpoint, logs and data workers are closed: every
    rank waits for the others (so that none closes its sockets, or rank 0 the rendezvous
    store, while a peer still talks to it), the process groups go, and the process exits at
    once. Skipping the interpreter's teardown is deliberate: a gloo rank could abort there
    ("terminate called without an active exception", seen once in CI after a clean run,
    rank 1), when native threads and tensors outlive the objects that own them."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

