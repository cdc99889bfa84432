"""Turn a URL+caption table into webdataset shards: one task per shard of N rows.

The driver: checks before any worker starts (``preflight``), then streams the table's
shards to ``ingest_shard`` tasks, on local processes or on the caller's Ray (``runners``;
``cluster.ray.session.ray_session``), and fails loudly naming a shard that could not be
written. The files of a shard and their atomic commit are
``data_pipeline.shards.format``'s; a rerun skips committed shards.
``retry_failed`` redoes only the failed rows of committed shards. Exact duplicates (by
content hash) are dropped across the whole run.
"""

from __future__ import annotations

import resource
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

from data_pipeline.config import IngestConfig, InputError
from data_pipeline.ingest.runners import LocalRunner, RayRunner
from data_pipeline.ingest.summary import IngestSummary
from data_pipeline.ingest.table import check_columns, count_rows, iter_shards, table_schema
from data_pipeline.shards.format import committed_shards, remove_stale_temporaries, shard_paths, write_sizes


@dataclass
class _Run:
    """The driver's view of one ingest run."""

    runner: Any  # a runners.RayRunner or LocalRunner
    output_dir: str
    cfg: IngestConfig
    summary: IngestSummary
    retry_failed: bool
    retry_reasons: frozenset[str] | None
    metrics: Any = None
    in_flight: dict = field(default_factory=dict)
    rows_done: int = 0
    failed_done: int = 0

    def finish(self, handle) -> None:
        sid, n_rows = self.in_flight.pop(handle)
        try:
            stats = self.runner.result(handle)
        except Exception as e:
            self.runner.cancel(list(self.in_flight))
            raise self.failure(sid, e) from e
        self.runner.notify("finish", sid)
        self.summary.add(stats)
        self.rows_done += n_rows
        self.failed_done += 0 if stats.get("skipped") else stats["failed"]
        if self.metrics:
            self.metrics.record_shard(stats)

    def failure(self, sid: int, error: Exception) -> "ShardFailed":
        """The error naming the shard, where it goes and whether it was retried (only a
        transient error or a lost worker is)."""
        cause, retried = self.runner.failure(error)
        how = f"after {self.cfg.task_retries} retries" if retried else "(not retried: it would fail again)"
        where = shard_paths(self.output_dir, sid)["tar"]
        return ShardFailed(f"ingest: shard {sid:05d} ({where}) failed {how}: {type(cause).__name__}: {cause}")


class ShardFailed(RuntimeError):
    """A shard could not be written; the message names the shard, its path and the cause."""


def _run_shards(run: _Run, input_path: str, committed: set[int], total_rows: int | None,
                progress: bool) -> None:
    from tqdm import tqdm

    cfg, runner, summary = run.cfg, run.runner, run.summary
    # A bounded window keeps the rows of at most a few shards in memory at once.
    window = 2 * runner.concurrency
    start = time.monotonic()
    # Our own rate: tqdm's would count the rows of skipped shards as processed at once.
    bar_format = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
                  if total_rows else "{desc}: {n_fmt} rows [{elapsed}{postfix}]")
    bar = tqdm(total=total_rows, disable=not progress, desc="ingest", bar_format=bar_format)

    def refresh(wait_s: float) -> None:
        runner.registry()
        for handle in runner.wait(list(run.in_flight), wait_s) if run.in_flight else []:
            run.finish(handle)
        running, running_failed = runner.call("running_totals")
        bar.n = run.rows_done + running
        rate = (bar.n - skipped_rows) / max(time.monotonic() - start, 1e-9)
        bar.set_postfix_str(f"{rate:.1f} samples/s, {run.failed_done + running_failed} failed", refresh=False)
        bar.refresh()
        if run.metrics:  # shards not yet submitted (known when the table's length is)
            queued = -(-total_rows // cfg.shard_size) - summary.shards_total if total_rows else 0
            run.metrics.set_queue(queued=max(queued, 0), in_flight=len(run.in_flight))

    skipped_rows = 0
    with bar:
        for sid, rows in enumerate(iter_shards(input_path, cfg.shard_size, url_col=cfg.url_col,
                                               caption_col=cfg.caption_col)):
            summary.shards_total += 1
            if sid in committed and not run.retry_failed:
                summary.shards_skipped += 1
                if run.in_flight:  # a submitted task waits for the registry: skipping may take a while
                    runner.registry()
                skipped_rows += rows.num_rows
                run.rows_done += rows.num_rows
                if run.metrics:
                    run.metrics.record_shard({"skipped": True})
                continue
            while len(run.in_flight) >= window:
                refresh(0.5)
            handle = runner.submit(rows, sid, run.output_dir, cfg, registry=runner.task_registry,
                                   retry_reasons=run.retry_reasons, retry_failed=run.retry_failed)
            run.in_flight[handle] = (sid, rows.num_rows)
            del rows
            if len(run.in_flight) >= runner.concurrency:  # every worker has a task: now the registry
                runner.registry()
        while run.in_flight:
            refresh(0.5)
        refresh(0)


def check_writable(output_dir: str) -> None:
    """Creates ``output_dir`` and writes and removes a small probe file there (one PUT and
    one DELETE on an object store); raises ``InputError`` naming the directory if it cannot.
    A probe left by a crash has a temporary's name, which the next run removes."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    probe = f"{root.rstrip('/')}/.write-probe.tmp-{uuid.uuid4().hex}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"probe")
        fs.rm(probe)
    except OSError as e:
        raise InputError(f"--output {output_dir}: cannot write there ({type(e).__name__}: {e})") from None


def preflight(input_path: str, output_dir: str, cfg: IngestConfig) -> bool:
    """The checks that need no Ray, run before it is started (which takes seconds): the table's
    columns (read from its head only) and a probe write to ``output_dir``. Raises
    ``InputError``; an empty table is only warned about (on stderr). -> whether it has rows."""
    names, has_rows = table_schema(input_path)
    if names:
        check_columns(input_path, names, url_col=cfg.url_col, caption_col=cfg.caption_col)
    if not has_rows:
        print(f"warning: {input_path} has no rows: nothing to ingest", file=sys.stderr, flush=True)
        return False
    check_writable(output_dir)
    return True


def ingest(
    input_path: str, output_dir: str, cfg: IngestConfig, *, processes: int | None = None, progress: bool = True,
    metrics=None, retry_failed: bool = False, retry_reasons: frozenset[str] | None = None, checked: bool = False,
) -> IngestSummary:
    """Ingest the whole table; raises ``ShardFailed`` naming the shard if one fails for good.

    ``preflight`` runs first, before any worker is started (``checked``: the caller ran
    it); an empty table returns an empty summary. ``processes``: run the shard tasks on
    that many local processes, without Ray (``runners.LocalRunner``; they start through
    multiprocessing's forkserver, so a script calling this needs the usual ``if __name__ ==
    "__main__":`` guard); None: on the Ray the caller initialised (inside ``cluster.ray.session.ray_session()``), RuntimeError without
    one. The table is streamed (the driver's memory does not grow with it). Committed
    shards are skipped, or with ``retry_failed`` redone for their failed rows (see
    ``ingest_shard``). ``metrics``: an optional ``data_pipeline.metrics.IngestMetrics`` fed
    as shards finish."""
    start = time.monotonic()
    if not checked and not preflight(input_path, output_dir, cfg):
        return IngestSummary()
    if processes is None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("ingest needs Ray or local processes: call it inside "
                               "cluster.ray.session.ray_session(), or with processes=N")
    fs, root = fsspec.core.url_to_fs(output_dir)
    fs.makedirs(root, exist_ok=True)
    remove_stale_temporaries(fs, root)
    committed = committed_shards(fs, root)
    total_rows = count_rows(input_path)
    summary = IngestSummary()
    runner = RayRunner(ray, cfg.task_retries) if processes is None else LocalRunner(processes, cfg.task_retries)
    if cfg.fetch.rate_limit_per_domain > 0:  # the run's budget, shared by the running tasks
        fetch_cfg = cfg.fetch.model_copy(update={
            "rate_limit_per_domain": cfg.fetch.rate_limit_per_domain / runner.concurrency})
        cfg = cfg.model_copy(update={"fetch": fetch_cfg})
    run = _Run(runner, output_dir, cfg, summary, retry_failed, retry_reasons, metrics)
    ok = False
    try:
        if cfg.dedup and committed:  # the owners of committed images, before any task claims
            runner.call("load_committed", output_dir, sorted(committed))
        _run_shards(run, input_path, committed, total_rows, progress)
        ok = True
    finally:
        runner.close(ok)
    missing = sorted(set(range(summary.shards_total)) - committed_shards(fs, root))
    if missing:  # never silently lose a shard
        raise ShardFailed(f"ingest: shard(s) {', '.join(f'{s:05d}' for s in missing[:10])} not committed "
                          f"in {output_dir}")
    write_sizes(fs, root)
    summary.elapsed_s = time.monotonic() - start
    summary.driver_peak_rss_bytes = peak_rss_bytes()
    return summary


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, whose count starts at the exec.
    (``ru_maxrss`` does not: after fork and exec it starts from the parent's peak, so a
    driver started by a 500 MiB process reported at least 500 MiB.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
