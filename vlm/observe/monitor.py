"""`vlm monitor RUN_DIR`: a local Prometheus server (the real binary) for one run.

It writes `{run_dir}/monitor/prometheus.yml`, which scrapes every target the run's workers
announce in `{run_dir}/metrics/targets/*.json` and evaluates the alert rules of
deploy/prometheus/alerts.yml, and keeps its database in `{run_dir}/monitor/data`."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from vlm.observe.metrics import TARGETS_DIR

DEFAULT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
MONITOR_DIR = "monitor"


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise FileNotFoundError("the `prometheus` binary is not on PATH: `make install` installs Debian's "
                                "package (apt-get install prometheus)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_config(run_dir: Path, *, scrape_interval: str = "2s", rules: Path | None = DEFAULT_RULES) -> Path:
    """The run's prometheus.yml: file_sd over the run's target files, the alert rules."""
    run_dir = Path(run_dir).resolve()
    out = run_dir / MONITOR_DIR
    out.mkdir(parents=True, exist_ok=True)
    targets = run_dir / "metrics" / TARGETS_DIR
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


class Prometheus:
    """One Prometheus process on 127.0.0.1 for a run: start(), query(), stop(), or `with`."""

    def __init__(self, run_dir: str | Path, *, port: int = 9090, scrape_interval: str = "2s",
                 rules: Path | None = DEFAULT_RULES, host: str = "127.0.0.1", enable_lifecycle: bool = False):
        """enable_lifecycle: serve /-/reload and /-/quit, which reload or stop the server on
        an unauthenticated POST from anyone who can reach the port: off unless asked."""
        self.run_dir = Path(run_dir)
        self.enable_lifecycle = enable_lifecycle
        self.host, self.port = host, port or free_port(host)
        self.scrape_interval, self.rules = scrape_interval, rules
        self.url = f"http://{self.host}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.run_dir / MONITOR_DIR / "prometheus.log"

    def command(self, binary: str, config: Path) -> list[str]:
        """The server's command line."""
        cmd = [binary, f"--config.file={config}", f"--web.listen-address={self.host}:{self.port}",
               f"--storage.tsdb.path={config.parent / 'data'}", "--storage.tsdb.retention.time=30d"]
        return cmd + ["--web.enable-lifecycle"] if self.enable_lifecycle else cmd

    def start(self, timeout: float = 60) -> str:
        """Starts the server and waits until it is ready; returns its URL."""
        binary = prometheus_binary()
        config = write_config(self.run_dir, scrape_interval=self.scrape_interval, rules=self.rules)
        with socket.socket() as s:
            if s.connect_ex((self.host, self.port)) == 0:
                raise ValueError(f"port {self.port} on {self.host} is taken: pass --port with a free one (0: any)")
        cmd = self.command(binary, config)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; its log ends:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self.url
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout:.0f}s; its log ends:\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def api(self, path: str, **params) -> dict:
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
    raise KeyboardInterrupt


def run_monitor(run_dir: str | Path, *, port: int = 9090, scrape_interval: str = "2s",
                duration: float | None = None, enable_lifecycle: bool = False) -> int:
    """Foreground: serves until Ctrl-C, or for `duration` seconds."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory")
    server = Prometheus(run_dir, port=port, scrape_interval=scrape_interval, enable_lifecycle=enable_lifecycle)
    # SIGTERM (a job scheduler, `kill`) stops the server as Ctrl-C does, also one that comes
    # while it starts: the server is never left running without us
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = server.start()
        print(f"Prometheus for {run_dir} at {url} (targets: {run_dir / 'metrics' / TARGETS_DIR}/*.json)")
        print(f"alerts: {url}/alerts   config: {run_dir / MONITOR_DIR / 'prometheus.yml'}   Ctrl-C stops it",
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
