"""The local runner of ingest's shard tasks (no Ray): retries after a transient error or
a dead worker and never after anything else, its registry reached from the workers, a
stop that leaves no process behind; and the driver on it, against a loopback server."""
from __future__ import annotations

import os
import tarfile
import time

import pyarrow.parquet as pq
import pytest

from data_pipeline.config import FetchConfig, IngestConfig
from data_pipeline.ingest.driver import ShardFailed, ingest
from data_pipeline.ingest.runners import LocalRunner
from demo.config import CorpusConfig
from demo.corpus import generate_corpus
from demo.server import ImageServer
from demo.tables import write_url_table
from support import flaky_tasks

TIMEOUT_S = 60


def _finish(runner: LocalRunner, handle):
    deadline = time.monotonic() + TIMEOUT_S
    while not runner.wait([handle], 1.0):
        assert time.monotonic() < deadline, "the task did not finish"
    return handle


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("retries, attempts", [(1, 2), (0, 1)])
def test_a_dead_worker_is_replaced_and_its_task_retried(tmp_path, retries, attempts):
    runner = LocalRunner(1, retries, task=flaky_tasks.dies_once)
    ok = False
    try:
        handle = _finish(runner, runner.submit(str(tmp_path / "m"), 7))
        assert handle.attempts == attempts
        if retries:
            assert runner.result(handle)["value"] == 7
        else:
            with pytest.raises(Exception) as failed:
                runner.result(handle)
            cause, retried = runner.failure(failed.value)
            assert type(cause).__name__ == "BrokenProcessPool" and retried
            # the pool was replaced: the next task runs
            again = _finish(runner, runner.submit(str(tmp_path / "m"), 8))
            assert runner.result(again)["value"] == 8
        ok = True
    finally:
        runner.close(ok)


def test_transient_errors_are_retried_and_others_are_not(tmp_path):
    runner = LocalRunner(2, 2, task=flaky_tasks.connection_error_once)
    try:
        handle = _finish(runner, runner.submit(str(tmp_path / "a"), 1))
        assert (handle.attempts, runner.result(handle)["value"]) == (2, 1)
        runner._task = flaky_tasks.value_error_once
        handle = _finish(runner, runner.submit(str(tmp_path / "b"), 2))
        assert handle.attempts == 1
        with pytest.raises(ValueError, match="would fail again") as failed:
            runner.result(handle)
        assert runner.failure(failed.value) == (failed.value, False)
    finally:
        runner.close(True)


def test_workers_share_the_run_registry_and_close_stops_everything(tmp_path):
    runner = LocalRunner(2, 0, task=flaky_tasks.registry_claim)
    digest = bytes(range(32))
    first = _finish(runner, runner.submit(runner.task_registry, 0, digest, "000000000"))
    assert runner.result(first)["owner"] == "000000000"
    second = _finish(runner, runner.submit(runner.task_registry, 3, digest, "000030005"))
    assert runner.result(second)["owner"] == "000000000"  # claimed by shard 0 in another process
    assert runner.call("size") == 1
    workers = [p.pid for p in runner._pool._processes.values()]
    assert workers
    runner.close(False)
    assert not [pid for pid in workers if _alive(pid)]


def test_zero_processes_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        LocalRunner(0, 0)


# ---------------------------------------------------------------- the driver on local processes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    corpus = generate_corpus(CorpusConfig(num_train=40, num_heldout=0, image_size=48),
                             tmp_path_factory.mktemp("corpus"))
    with ImageServer(corpus.root) as srv:
        path = str(tmp_path_factory.mktemp("table") / "urls.parquet")
        write_url_table(corpus, srv.url, path, split="train", include_broken=True)
        yield path  # 40 good rows then the 4 broken ones: shards of 16 -> 16, 16, 12


def _cfg() -> IngestConfig:
    fetch = FetchConfig(deadline_s=1.5, retries=0, backoff_s=0.05, allow_private_hosts=["127.0.0.1"])
    return IngestConfig(shard_size=16, threads=8, image_size=32, fetch=fetch)


def test_ingest_on_local_processes_then_rerun_skips(served, tmp_path):
    summary = ingest(served, str(tmp_path), _cfg(), processes=2, progress=False)
    assert (summary.shards_total, summary.shards_written, summary.shards_skipped) == (3, 3, 0)
    assert (summary.samples_success, summary.samples_failed) == (40, 4)
    assert summary.failures_by_reason["http_404"] == 1
    assert summary.failures_by_reason["decode_error"] == 2
    keys = [r["key"] for sid in range(3) for r in pq.read_table(tmp_path / f"{sid:05d}.parquet").to_pylist()]
    assert len(keys) == len(set(keys)) == 44

    rerun = ingest(served, str(tmp_path), _cfg(), processes=2, progress=False)
    assert (rerun.shards_skipped, rerun.shards_written) == (3, 0)


def test_local_ingest_fails_loudly_naming_the_shard(served, tmp_path):
    (tmp_path / "00001.tar").mkdir()  # the atomic rename of shard 1's tar cannot succeed
    cfg = _cfg().model_copy(update={"task_retries": 1})
    with pytest.raises(ShardFailed, match=r"shard 00001 .*not retried: it would fail again"):
        ingest(served, str(tmp_path), cfg, processes=2, progress=False)
    assert not (tmp_path / "00001_stats.json").exists()
    assert os.path.isdir(tmp_path / "00001.tar")


def test_driver_peak_rss_is_its_own_not_its_parents():
    """ru_maxrss of a process started by a big one starts at the parent's peak; the
    summary's figure must not (the ingest benchmark's parent holds a 1M-row table)."""
    import subprocess
    import sys

    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # resident, not just reserved
    code = ("import resource; from data_pipeline.ingest.driver import peak_rss_bytes; "
            "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    own, inherited_kib = (int(v) for v in out.stdout.split())
    del ballast
    assert inherited_kib * 1024 > 400 * 2**20  # what the old figure would have said
    assert own < 300 * 2**20


def test_ingest_writes_sizes_json_as_openclip_reads_it(served, tmp_path):
    """OpenCLIP's webdataset loader sums sizes.json[basename(tar)] over its shards to size
    an epoch (without --train-num-samples); a rerun rewrites it whole."""
    import json

    summary = ingest(served, str(tmp_path), _cfg(), processes=2, progress=False)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sorted(sizes) == ["00000.tar", "00001.tar", "00002.tar"]
    assert sum(sizes[p.name] for p in tmp_path.glob("*.tar")) == summary.samples_success == 40
    for name, n in sizes.items():
        with tarfile.open(tmp_path / name) as t:
            assert sum(m.name.endswith(".txt") for m in t) == n
    (tmp_path / "sizes.json").write_text("{}")
    ingest(served, str(tmp_path), _cfg(), processes=2, progress=False)  # all skipped: rewritten anyway
    assert json.loads((tmp_path / "sizes.json").read_text()) == sizes
