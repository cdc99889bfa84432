"""`vlm train` (the Ray driver, 2 workers) with run_dir on S3 (moto on 127.0.0.1) while
`vlm monitor s3://…` serves: the driver trains the tokenizer into the bucket, the workers
read it and write config, step log, metrics targets and checkpoints there, nothing lands in
the working directory; the monitor, which shares nothing with the run but the bucket (it
has its own temp dir), mirrors the workers' targets so that Prometheus scrapes both ranks,
and drops them once the run has ended. A bucket it cannot read is said, not a traceback."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.ports import free_port
from support.s3 import moto_s3
from support.shardgen import TINY_MODEL, set_args, write_shards
from vlm import rundir
from vlm.observe.monitor import Prometheus

pytestmark = pytest.mark.e2e
VLM = str(Path(sys.executable).parent / "vlm")
REPO = Path(__file__).resolve().parents[2]
RUN = "ray-s3"
URL = "s3://ray-monitor/run"
# many steps: the driver is stopped (SIGTERM: the workers save and end) once Prometheus has seen them
TINY = [*TINY_MODEL, "train.micro_batch_size=8", "train.log_every=5", "train.steps=5000",
        "train.checkpoint_every=10000", "eval.every_steps=0", "metrics.port=0", f"name={RUN}"]


def start(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """`vlm ARGS` in `cwd`, its output into `log` (a file, not a pipe: nothing blocks on it)."""
    with open(log, "w") as out:
        return subprocess.Popen([VLM, *args], cwd=cwd, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for(what: str, check, procs: dict[str, tuple[subprocess.Popen, Path]], timeout: float):
    """Polls check() until it returns something truthy; fails when a process ends first or
    after `timeout` seconds, with the processes' output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n" +
                "\n".join(f"--- {n}\n{log.read_text()[-2000:]}" for n, (_, log) in procs.items()))


def ranks_stepping(prom: Prometheus) -> dict | None:
    """{rank: steps} once Prometheus has scraped a finished step from both ranks."""
    try:
        seen = {r["metric"].get("rank"): float(r["value"][1])
                for r in prom.query(f'vlm_train_steps_total{{run="{RUN}"}}')}
    except OSError:  # not serving yet
        return None
    return seen if set(seen) == {"0", "1"} and min(seen.values()) >= 1 else None


def bucket_targets(fs) -> list[str]:
    """The target files in the bucket now (s3fs caches listings: refreshed)."""
    fs.invalidate_cache()
    return fs.glob(f"{URL}/metrics/targets/*.json")


def stop(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def test_ray_run_on_s3_is_scraped_by_a_remote_monitor(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, n=128, per_shard=64)
    cwd, monitor_tmp = tmp_path / "cwd", tmp_path / "monitor-tmp"
    cwd.mkdir()
    monitor_tmp.mkdir()
    mirror = monitor_tmp / rundir.SCRATCH_ROOT / rundir.scratch_dir(URL).name / "monitor" / "targets"
    port = free_port()
    prom = Prometheus(URL, port=port)  # only its query helpers: the server is `vlm monitor`'s
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    with moto_s3("ray-monitor") as (fs, env):
        missing = subprocess.run([VLM, "monitor", "s3://no-such-bucket/run", "--port", "0", "--for", "1"], cwd=cwd,
                                 env={**os.environ, **env, "TMPDIR": str(monitor_tmp)}, capture_output=True,
                                 text=True, timeout=120)
        assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr
        assert "vlm: error: cannot read s3://no-such-bucket/run/metrics/targets" in missing.stderr
        try:
            procs["monitor"] = (start(["monitor", URL, "--port", str(port), "--scrape-interval", "1s", "--for", "300"],
                                      cwd, {**env, "TMPDIR": str(monitor_tmp)}, tmp_path / "monitor.log"),
                                tmp_path / "monitor.log")
            procs["train"] = (start(["train", "--config", str(REPO / "configs" / "demo.yaml"),
                                     *set_args(*TINY, f"run_dir={URL}", f"data.train_shards={shards}")],
                                    cwd, env, tmp_path / "train.log"), tmp_path / "train.log")
            wait_for("the workers' targets in the bucket", lambda: len(bucket_targets(fs)) == 2, procs, 240)
            wait_for("Prometheus to scrape both ranks", lambda: ranks_stepping(prom), procs, 60)
            assert {r["metric"]["rank"] for r in prom.query(f'up{{run="{RUN}"}} == 1')} == {"0", "1"}
            assert sorted(p.name for p in mirror.glob("*.json")) == ["rank0.json", "rank1.json"]
            train, train_log = procs.pop("train")
            assert stop(train, 120) == 128 + signal.SIGTERM, train_log.read_text()[-4000:]
            out = train_log.read_text()
            assert f"trained a BPE tokenizer on the training captions: {URL}/tokenizer.json" in out
            assert "stopped at step" in out and f"checkpoint {URL}/checkpoints/step_" in out, out[-4000:]
            # a clean end withdraws the targets from the bucket, and the mirror follows
            wait_for("the mirror to drop the ended run's targets", lambda: not list(mirror.glob("*.json")),
                     procs, 30)
            monitor, monitor_log = procs.pop("monitor")
            assert stop(monitor, 30) == 0, monitor_log.read_text()[-4000:]
        finally:
            for proc, _ in procs.values():
                stop(proc, 30)
            shutil.rmtree(rundir.scratch_dir(URL), ignore_errors=True)  # the driver node's scratch
        tag = rundir.read_text(f"{URL}/checkpoints/latest")
        for name in ("tokenizer.json", "config.yaml", "train_log.jsonl", f"checkpoints/{tag}/manifest.json"):
            assert rundir.exists(f"{URL}/{name}"), name
        assert f"name: {RUN}" in rundir.read_text(f"{URL}/config.yaml")
        assert not bucket_targets(fs)
    assert list(cwd.iterdir()) == []  # nothing in the working directory
    assert (mirror.parent / "data").is_dir() and (mirror.parent / "prometheus.yml").is_file()
