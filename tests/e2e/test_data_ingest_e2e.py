"""`vlm data ingest` end to end: a hostile loopback server through Ray, retrying failed
rows, reading the shards back with webdataset and the training reader, S3 on a loopback
moto server, and a SIGKILLed (on Ray and on local processes) or Ctrl-C'd driver resumed."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import FetchConfig, IngestConfig
from demo.config import CorpusConfig
from data_pipeline.ingest.driver import ingest
from data_pipeline.shards.reader import ShardReader
from data_pipeline.shards.samples import list_shards
from demo.server import ImageServer
from demo.corpus import generate_corpus
from support.ports import free_port
from support.s3 import moto_s3

REPO = Path(__file__).resolve().parents[2]
VLM = str(Path(sys.executable).parent / "vlm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate_corpus(CorpusConfig(num_train=40, num_heldout=0, image_size=48),
                           tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def server(corpus):
    with ImageServer(corpus.root) as srv:
        yield srv


@pytest.fixture(scope="module")
def private_server(corpus):
    """A listener on 127.0.0.2 standing for an intranet host: it must never be asked."""
    with ImageServer(corpus.root, host="127.0.0.2") as srv:
        yield srv


@pytest.fixture(scope="module")
def s3():
    # set in os.environ before Ray starts, so its workers inherit it; the S3-only endpoint
    # variable, which s3fs honours as well as the general one the other tests use
    with moto_s3("vlm-test", endpoint_var="AWS_ENDPOINT_URL_S3") as (_, env):
        yield env


@pytest.fixture(scope="module")
def ray_local(s3):
    from cluster.ray.session import ray_session

    # the workers inherit the s3 fixture's variables (set in os.environ before Ray starts)
    with ray_session(num_cpus=2, lean=True) as ray:
        yield ray


def _paths(corpus) -> list[str]:
    return [r["path"] for r in corpus.split("train")]


def _cfg(**update) -> IngestConfig:
    fetch = FetchConfig(deadline_s=1.0, connect_timeout_s=0.5, retries=1, backoff_s=0.05,
                        allow_private_hosts=["127.0.0.1"], resolve={"intranet.test": ["127.0.0.2"]})
    return IngestConfig(shard_size=8, threads=8, image_size=32, fetch=fetch,
                        languages=["en"], min_language_score=0.2, **update)


def _read_status(out: Path) -> list[dict]:
    rows = []
    for p in sorted(out.glob("[0-9]*.parquet")):
        if not p.name.endswith("_scores.parquet"):
            rows += pq.read_table(p).to_pylist()
    return rows


def _hostile_table(corpus, server, private_server, path: Path) -> dict[str, set[str]]:
    """Good rows and one row per hostile case; returns url -> the reasons it may end in."""
    paths = _paths(corpus)
    base, h = server.url, server.hostile_urls()
    b = server.broken_urls()
    en = "a small {} picture on a plain background"
    expect: dict[str, set[str]] = {}
    rows = []

    def add(url, reasons, caption=None):
        rows.append({"url": url, "caption": caption or en.format(len(rows)), "row": len(rows)})
        expect[url] = set(reasons)

    for p in paths[:14]:
        add(f"{base}/{p}", {None})
    add(b["missing"], {"http_404"})
    add(h["server_error"], {"http_500"})
    add(b["never_answers"], {"timeout", "deadline"})
    add(h["slow_drip"], {"deadline"})
    add(b["truncated"], {"decode_error"})
    add(b["not_an_image"], {"decode_error"})
    add(h["empty"], {"empty_body"})
    add(h["bomb"], {"too_many_pixels"})
    add(h["redirect_loop"], {"too_many_redirects"})
    add(f"{base}/optout/{paths[20]}", {"robots_optout"})
    add(f"{base}/copy/a/{paths[0]}", {"duplicate"})  # same bytes as row 0, same shard
    add(f"{base}/copy/b/{paths[1]}", {"duplicate"})  # same bytes as row 1, another shard
    add(f"http://intranet.test:{private_server.url.rsplit(':', 1)[1]}/{paths[21]}", {"private_address"})
    add(f"{base}/{paths[22]}", {"no_caption"}, caption="   ")
    add(f"{base}/{paths[23]}", {"wrong_language"}, caption="une petite photo d'un chat noir sur la table")
    add("ftp://example.invalid/x.jpg", {"bad_url"})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return expect


def test_hostile_corpus_every_row_one_status(ray_local, corpus, server, private_server, tmp_path):
    table = tmp_path / "urls.parquet"
    expect = _hostile_table(corpus, server, private_server, table)
    out = tmp_path / "shards"
    summary = ingest(str(table), str(out), _cfg(), progress=False)

    rows = _read_status(out)
    assert sorted(r["row"] for r in rows) == list(range(len(expect)))  # every row exactly once
    for r in rows:
        assert r["status"] in ("success", "failed_to_download", "failed_to_resize")
        assert (r["reason"] is None) == (r["status"] == "success")
        assert r["reason"] in expect[r["url"]], (r["url"], r["reason"], r["error_message"])
    assert private_server.request_count == 0  # refused before connecting
    dup_of = {r["url"].rsplit("/", 1)[1]: r["error_message"] for r in rows if r["reason"] == "duplicate"}
    assert len(dup_of) == 2 and all("same image as" in e for e in dup_of.values())

    n_ok = sum(r["status"] == "success" for r in rows)
    assert (summary.samples_success, summary.samples_failed) == (n_ok, len(rows) - n_ok) == (14, len(rows) - 14)
    for stats_file in out.glob("*_stats.json"):
        stats = json.loads(stats_file.read_text())
        shard_rows = pq.read_table(out / stats_file.name.replace("_stats.json", ".parquet")).to_pylist()
        assert stats["total"] == len(shard_rows)
        assert stats["success"] == sum(r["status"] == "success" for r in shard_rows)
        assert sum(stats["failures_by_reason"].values()) == stats["failed"]
        with tarfile.open(out / stats_file.name.replace("_stats.json", ".tar")) as tar:
            assert len([n for n in tar.getnames() if n.endswith(".jpg")]) == stats["success"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    # webdataset's own reader and the project's training reader see the same 14 samples
    import webdataset as wds

    tars = [str(p) for p in sorted(out.glob("*.tar"))]
    seen = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(seen) == 14
    assert all(s["jpg"].size == (32, 32) and s["json"]["status"] == "success" for s in seen)
    reader = iter(ShardReader(list_shards(str(out)), shuffle_block=4))
    keys = {next(reader)["__key__"] for _ in range(14)}
    assert keys == {s["__key__"] for s in seen}


def test_retry_failed_refetches_only_transient_failures(ray_local, corpus, server, tmp_path):
    paths = _paths(corpus)
    port = free_port()  # nothing listens here yet: connection_error
    rows = [{"url": f"{server.url}/{p}", "caption": f"good {i}"} for i, p in enumerate(paths[24:30])]
    rows += [{"url": f"http://127.0.0.1:{port}/{p}", "caption": f"late {i}"} for i, p in enumerate(paths[30:34])]
    rows += [{"url": server.broken_urls()["missing"], "caption": "missing"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    out = tmp_path / "shards"
    cfg = IngestConfig(shard_size=4, threads=4, fetch=FetchConfig(retries=0, allow_private_hosts=["127.0.0.1"]))
    first = ingest(str(tmp_path / "t.parquet"), str(out), cfg, progress=False)
    assert (first.samples_success, first.failures_by_reason) == (6, {"connection_error": 4, "http_404": 1})

    before = {p: server.requests_for("/" + p) for p in paths[24:30]}
    missing_before = server.requests_for("/broken/missing.jpg")
    with ImageServer(corpus.root, port=port) as late:
        retry = ingest(str(tmp_path / "t.parquet"), str(out), cfg, progress=False, retry_failed=True)
        assert late.request_count == 4
    assert retry.samples_fetched == 4  # only the transient failures
    assert {p: server.requests_for("/" + p) for p in paths[24:30]} == before
    assert server.requests_for("/broken/missing.jpg") == missing_before
    status = _read_status(out)
    assert len(status) == len(rows) and sum(r["status"] == "success" for r in status) == 10
    assert len(list(iter_all(out))) == 10  # old and new images together in the tars

    again = ingest(str(tmp_path / "t.parquet"), str(out), cfg, progress=False, retry_failed=True)
    assert again.samples_fetched == 0  # only the 404 is left, not transient


def iter_all(out: Path):
    from data_pipeline.shards.samples import iter_tar_samples

    for tar in list_shards(str(out)):
        yield from iter_tar_samples(tar)


def test_s3_input_and_output(ray_local, corpus, server, s3):
    import fsspec

    fs = fsspec.filesystem("s3")  # the bucket: made by the s3 fixture
    rows = [{"url": f"{server.url}/{p}", "caption": f"picture {i}"} for i, p in enumerate(_paths(corpus)[:10])]
    with fs.open("vlm-test/in/urls.jsonl", "wb") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    cfg = IngestConfig(shard_size=4, threads=4, fetch=FetchConfig(retries=0, allow_private_hosts=["127.0.0.1"]))
    summary = ingest("s3://vlm-test/in/urls.jsonl", "s3://vlm-test/shards", cfg, progress=False)
    assert (summary.shards_written, summary.samples_success) == (3, 10)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("vlm-test/shards", detail=False))
    assert names == [f"0000{i}{ext}" for i in range(3) for ext in (".parquet", ".tar", "_stats.json")] + ["sizes.json"]
    with fs.open("vlm-test/shards/sizes.json", "r") as f:
        assert json.load(f) == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}
    shards = list_shards("s3://vlm-test/shards")
    reader = iter(ShardReader(shards, shuffle_block=2))
    assert len({next(reader)["__key__"] for _ in range(10)}) == 10
    rerun = ingest("s3://vlm-test/in/urls.jsonl", "s3://vlm-test/shards", cfg, progress=False)
    assert rerun.shards_skipped == 3


def _session_processes(sid: int) -> list[int]:
    """The live processes of session ``sid`` (a driver started with start_new_session and
    everything it started: Ray's or the local runner's workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _ingest_cmd(tmp_path, server, corpus, backend: str, ray_local) -> tuple[list[str], list[dict], Path]:
    paths = _paths(corpus)
    rows = [{"url": f"{server.url}/{p}", "caption": f"picture number {i}", "row": i} for i, p in enumerate(paths)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    out = tmp_path / "shards"
    # On Ray the drivers join the test's Ray instance, as a driver on a cluster would (and
    # skip starting one of their own twice); the kill takes the driver alone.
    where = (["--ray-address", ray_local.get_runtime_context().gcs_address] if backend == "ray"
             else ["--processes", "2"])
    cmd = [VLM, "data", "ingest", "--input", str(tmp_path / "t.parquet"), "--output", str(out),
           "--no-progress", "--metrics-port", "-1", *where,
           "--set", "data.ingest.shard_size=4", "--set", "data.ingest.threads=2",
           "--set", "data.ingest.fetch.rate_limit_per_domain=12",
           "--set", "data.ingest.fetch.allow_private_hosts=[127.0.0.1]"]
    return cmd, rows, out


def _first_commit_then(proc: subprocess.Popen, out: Path, sig: int) -> None:
    deadline = time.monotonic() + 90
    while not list(out.glob("*_stats.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list(out.glob("*_stats.json")), "no shard committed within 90 s"
    assert proc.poll() is None, "the run finished before it could be stopped"
    os.kill(proc.pid, sig)


@pytest.mark.parametrize("backend", ["ray", "local"])
def test_sigkill_driver_then_rerun_has_every_row_once(ray_local, corpus, server, tmp_path, backend):
    cmd, rows, out = _ingest_cmd(tmp_path, server, corpus, backend, ray_local)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _first_commit_then(proc, out, signal.SIGKILL)
        proc.wait(timeout=10)
        if backend == "local":  # nobody can stop the workers of a SIGKILLed driver: they stop themselves
            deadline = time.monotonic() + 20
            while _session_processes(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _session_processes(proc.pid), "local workers outlived their driver by 20 s"
    finally:
        with_group_killed(proc)
    committed_before = len(list(out.glob("*_stats.json")))
    assert committed_before < 10
    for tar in out.glob("*.tar"):  # whatever is named *.tar is a whole tar
        with tarfile.open(tar) as t:
            t.getmembers()
    assert not [p for p in out.iterdir() if p.suffix == ".tar" and ".tmp-" in p.name]

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    # a task already running when the driver died may still commit its shard: never fewer skipped
    skipped = int(re.search(r"(\d+) skipped", rerun.stdout).group(1))
    assert committed_before <= skipped < 10
    _assert_every_row_once(out, rows)


def test_ctrl_c_stops_local_workers_at_once_and_rerun_completes(ray_local, corpus, server, tmp_path):
    cmd, rows, out = _ingest_cmd(tmp_path, server, corpus, "local", ray_local)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A test run started in the background (nohup, `make test &`) ignores SIGINT, and a child
    # inherits that: the driver gets Ctrl-C's default disposition back, as in a terminal.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _first_commit_then(proc, out, signal.SIGINT)
        stopped = time.monotonic()
        output, _ = proc.communicate(timeout=20)
        assert time.monotonic() - stopped < 10
        assert proc.returncode == 130
        assert b"interrupted; the shards committed in" in output and b"Traceback" not in output
        deadline = time.monotonic() + 5  # the forkserver exits when it sees its driver gone
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in _session_processes(proc.pid)}
        assert not left, f"processes outlived the stopped driver by 5 s: {left}"
    finally:
        with_group_killed(proc)
    assert len(list(out.glob("*_stats.json"))) < 10
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    _assert_every_row_once(out, rows)


def _assert_every_row_once(out: Path, rows: list[dict]) -> None:
    status = _read_status(out)
    assert sorted(r["row"] for r in status) == list(range(len(rows)))
    assert all(r["status"] == "success" for r in status)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert len(list_shards(str(out))) == 10
    assert sorted(s["json"]["row"] for s in iter_all(out)) == list(range(len(rows)))


def with_group_killed(proc: subprocess.Popen) -> None:
    """The killed driver's own Ray processes (its session) go too, so nothing outlives the test."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)
