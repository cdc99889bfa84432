"""`vlm monitor RUN_DIR`: a local Prometheus server (the real binary) for one run.

It writes `{run_dir}/monitor/prometheus.yml`, which scrapes every target the run's workers
announce in `{run_dir}/metrics/targets/*.json` and evaluates the alert rules of
deploy/prometheus/alerts.yml, and keeps its database in `{run_dir}/monitor/data`.

Prometheus discovers targets in local files only. For a run directory on an object store
(s3://bucket/run: vlm.rundir) the config and database live in a local directory instead
(vlm.rundir.scratch_dir(run_dir)/monitor, or --data-dir), and a thread mirrors the bucket's
target files into its `targets/` at the scrape interval: a new or changed file is copied,
a local copy whose remote file is gone is removed (the worker ended), and while the bucket
cannot be read the last copies stay (a transient error drops no target)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from vlm import rundir
from vlm.observe.metrics import TARGETS_DIR

DEFAULT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
MONITOR_DIR = "monitor"
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def prometheus_binary() -> str:
    """The `prometheus` executable on PATH; FileNotFoundError saying how to install it."""
    path = shutil.which("prometheus")
    if path is None:
        raise FileNotFoundError("the `prometheus` binary is not on PATH: `make install` installs Debian's "
                                "package (apt-get install prometheus)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def duration_seconds(text: str) -> float:
    """A Prometheus duration (2s, 500ms, 1m30s) in seconds; ValueError for anything else."""
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"scrape interval {text!r} is not a Prometheus duration such as 2s, 500ms or 1m")
    return sum(int(n) * DURATION_UNITS[u] for n, u in parts)


def monitor_dir(run_dir: str | Path) -> Path:
    """Where the config, log and database go by default: {run_dir}/monitor for a local run
    directory, the run's local scratch directory's monitor/ for a URL."""
    return rundir.scratch_dir(run_dir) / MONITOR_DIR


def write_config(run_dir: str | Path | None, *, scrape_interval: str = "2s", rules: Path | None = DEFAULT_RULES,
                 out: Path | None = None, targets: Path | None = None) -> Path:
    """The run's prometheus.yml: file_sd over the run's target files, the alert rules.
    Written into `out` (default {run_dir}/monitor), watching `targets` (default
    {run_dir}/metrics/targets); both made if missing."""
    out = Path(out or Path(run_dir) / MONITOR_DIR).resolve()
    out.mkdir(parents=True, exist_ok=True)
    targets = Path(targets or Path(run_dir) / "metrics" / TARGETS_DIR).resolve()
    targets.mkdir(parents=True, exist_ok=True)  # so Prometheus can watch it before the first worker
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                   "scrape_timeout": scrape_interval},
        "scrape_configs": [{
            "job_name": "vlm",
            "honor_labels": True,  # the exporters' run/rank labels equal the targets'
            "file_sd_configs": [{"files": [str(targets / "*.json")],
                                 "refresh_interval": scrape_interval}],
        }],
    }
    if rules is not None and Path(rules).is_file():
        config["rule_files"] = [str(Path(rules).resolve())]
    path = out / "prometheus.yml"
    path.write_text("# written by `vlm monitor`; rewritten on every start\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def _version(entry: dict) -> tuple:
    """What tells one version of a listed object from the next: ETag (S3), else mtime, and size."""
    return (entry.get("ETag") or entry.get("etag") or entry.get("mtime") or entry.get("LastModified"),
            entry.get("size"))


class TargetMirror:
    """Keeps a local copy of a remote run's target files ({run_dir}/metrics/targets/*.json
    on an object store) for Prometheus' file_sd: sync() once, start()/stop() a thread that
    syncs every `interval_s` seconds."""

    def __init__(self, run_dir: str, local: Path, interval_s: float):
        self.remote = rundir.join(run_dir, "metrics", TARGETS_DIR)
        self.local, self.interval_s = Path(local), interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._copied: dict[str, tuple] = {}  # name -> the listed version copied

    def _unreadable(self, e: Exception) -> OSError:
        """The error that says the remote target files cannot be read, and what to check."""
        return OSError(f"cannot read {self.remote} ({type(e).__name__}: {e}): check that the bucket exists "
                       "and the credentials and endpoint (AWS_* variables, e.g. AWS_ENDPOINT_URL)")

    def check(self) -> None:
        """OSError, saying so, when the run directory's bucket cannot be listed (missing,
        no credentials, no endpoint); an empty or not yet written run directory is fine."""
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(self.remote)
            fs.ls(path.split("/", 1)[0], detail=False)
        except Exception as e:  # noqa: BLE001 - botocore's errors are no OSError
            raise self._unreadable(e) from None

    def sync(self) -> int:
        """One pass: each remote target file copied when new or changed (by its listed
        version: one listing per pass, a read only for what changed), each local copy whose
        remote file is gone removed. Returns how many target files there are; OSError
        naming the URL when the store cannot be read (the local copies stay as they are)."""
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(self.remote)
            fs.invalidate_cache(path)  # s3fs caches listings: a new or removed file would go unseen
            listed = {e["name"].rsplit("/", 1)[-1]: _version(e) for e in fs.ls(path, detail=True)
                      if e["name"].endswith(".json") and e.get("type") != "directory"}
        except FileNotFoundError:
            listed = {}  # no target yet (an object store has no empty directories)
        except Exception as e:  # noqa: BLE001 - botocore's errors are no OSError
            raise self._unreadable(e) from None
        self.local.mkdir(parents=True, exist_ok=True)
        for name, version in listed.items():
            if self._copied.get(name) != version or not (self.local / name).is_file():
                self._copy(fs, f"{path}/{name}", name)
                self._copied[name] = version
        for stale in self.local.glob("*.json"):
            if stale.name not in listed:
                stale.unlink(missing_ok=True)
                self._copied.pop(stale.name, None)
        return len(listed)

    def _copy(self, fs, path: str, name: str) -> None:
        """One target file into the local directory, replacing the old copy atomically."""
        try:
            body = fs.cat_file(path)
        except FileNotFoundError:
            return  # removed since it was listed: the next pass drops the local copy
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(e) from None
        tmp = self.local / f".{name}.tmp"  # not *.json: the file_sd glob must not read it half written
        tmp.write_bytes(body)
        os.replace(tmp, self.local / name)

    def _run(self) -> None:
        """The thread: a sync every interval until stop(); a failure is warned about, not fatal."""
        last_error = None
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
                last_error = None
            except OSError as e:
                if str(e) != last_error:  # said once per distinct failure, not every interval
                    print(f"warning: {e}; keeping the last targets, trying again every {self.interval_s:g}s",
                          flush=True)
                last_error = str(e)

    def start(self) -> None:
        """Checks the bucket and syncs once (OSError if it cannot be read), then keeps syncing."""
        self.check()
        self.sync()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="vlm-monitor-targets", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread (after the pass it is in)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None


class Prometheus:
    """One Prometheus process on 127.0.0.1 for a run: start(), query(), stop(), or `with`.
    `run_dir` may be a URL: its target files are then mirrored (TargetMirror)."""

    def __init__(self, run_dir: str | Path, *, port: int = 9090, scrape_interval: str = "2s",
                 rules: Path | None = DEFAULT_RULES, host: str = "127.0.0.1", enable_lifecycle: bool = False,
                 data_dir: str | Path | None = None):
        """enable_lifecycle: serve /-/reload and /-/quit, which reload or stop the server on
        an unauthenticated POST from anyone who can reach the port: off unless asked.
        data_dir: where the config, log and database go (default: monitor_dir(run_dir))."""
        remote = rundir.is_remote(str(run_dir))
        self.run_dir = str(run_dir) if remote else Path(run_dir)
        self.enable_lifecycle = enable_lifecycle
        self.host, self.port = host, port or free_port(host)
        self.scrape_interval, self.rules = scrape_interval, rules
        self.url = f"http://{self.host}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.data_dir = Path(data_dir) if data_dir else monitor_dir(self.run_dir)
        self.targets = self.data_dir / TARGETS_DIR if remote else self.run_dir / "metrics" / TARGETS_DIR
        self.mirror = TargetMirror(self.run_dir, self.targets, duration_seconds(scrape_interval)) if remote else None
        self.log_path = self.data_dir / "prometheus.log"

    def command(self, binary: str, config: Path) -> list[str]:
        """The server's command line."""
        cmd = [binary, f"--config.file={config}", f"--web.listen-address={self.host}:{self.port}",
               f"--storage.tsdb.path={config.parent / 'data'}", "--storage.tsdb.retention.time=30d"]
        return cmd + ["--web.enable-lifecycle"] if self.enable_lifecycle else cmd

    def start(self, timeout: float = 60) -> str:
        """Starts the target mirror (a remote run) and the server, and waits until the
        server is ready; returns its URL."""
        binary = prometheus_binary()
        config = write_config(None, scrape_interval=self.scrape_interval, rules=self.rules, out=self.data_dir,
                              targets=self.targets)
        with socket.socket() as s:
            if s.connect_ex((self.host, self.port)) == 0:
                raise ValueError(f"port {self.port} on {self.host} is taken: pass --port with a free one (0: any)")
        if self.mirror is not None:
            self.mirror.start()
        try:
            self._launch(binary, config, timeout)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _launch(self, binary: str, config: Path, timeout: float) -> None:
        """Starts the process; returns once /-/ready answers, raises if it exits or times out."""
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(binary, config), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; its log ends:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout:.0f}s; its log ends:\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        """The last `n` lines of the server's log ("" if there is none)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/{path}: the response's data; RuntimeError with the server's error."""
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query; returns the result vector ({"metric": labels, "value": [t, "v"]})."""
        return self.api("query", query=expr)["result"]

    def stop(self, timeout: float = 15) -> None:
        """Stops the mirror and the server (SIGTERM, then SIGKILL after `timeout`)."""
        if self.mirror is not None:
            self.mirror.stop()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "Prometheus":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame) -> None:
    """SIGTERM handler: stops run_monitor as Ctrl-C does."""
    raise KeyboardInterrupt


def run_monitor(run_dir: str | Path, *, port: int = 9090, scrape_interval: str = "2s",
                duration: float | None = None, enable_lifecycle: bool = False,
                data_dir: str | Path | None = None) -> int:
    """Foreground: serves until Ctrl-C, or for `duration` seconds."""
    remote = rundir.is_remote(str(run_dir))
    if not remote and not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory")
    server = Prometheus(run_dir, port=port, scrape_interval=scrape_interval, enable_lifecycle=enable_lifecycle,
                        data_dir=data_dir)
    # SIGTERM (a job scheduler, `kill`) stops the server as Ctrl-C does, also one that comes
    # while it starts: the server is never left running without us
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = server.start()
        source = rundir.join(run_dir, "metrics", TARGETS_DIR)
        mirrored = f", mirrored into {server.targets} every {scrape_interval}" if remote else ""
        print(f"Prometheus for {run_dir} at {url} (targets: {source}/*.json{mirrored})")
        print(f"alerts: {url}/alerts   config: {server.data_dir / 'prometheus.yml'}   Ctrl-C stops it",
              flush=True)
        deadline = None if duration is None else time.monotonic() + duration
        while deadline is None or time.monotonic() < deadline:
            if server.proc.poll() is not None:
                print(f"prometheus exited with {server.proc.returncode}:\n{server.log_tail()}", flush=True)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0
