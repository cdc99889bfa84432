"""`vlm monitor` runs the real Prometheus without its lifecycle API (/-/quit, /-/reload: an
unauthenticated POST stops or reloads the server) unless --enable-lifecycle asks for it."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support.ports import free_port

pytestmark = pytest.mark.e2e
VLM = str(Path(sys.executable).parent / "vlm")
REPO = Path(__file__).resolve().parents[2]


def status(url: str, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def monitor(run_dir: Path, *flags: str):
    """`vlm monitor` on a free port, once it says it serves; (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([VLM, "monitor", str(run_dir), "--port", str(port), "--for", "60", *flags],
                            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(60, proc.terminate)  # readline below cannot time out by itself
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Prometheus for"):
                url = f"http://127.0.0.1:{port}"
                assert f" at {url} " in line
                assert status(f"{url}/-/ready") == 200
                return proc, url
    finally:
        watchdog.cancel()
    proc.wait()
    pytest.fail(f"vlm monitor did not serve (rc {proc.returncode}): {''.join(lines)[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_lifecycle_api_is_off_by_default(tmp_path):
    proc, url = monitor(tmp_path)
    try:
        assert status(f"{url}/-/quit", "POST") == 403
        assert status(f"{url}/-/reload", "POST") == 403
        time.sleep(1)
        assert proc.poll() is None and status(f"{url}/-/ready") == 200  # still serving
        ps = subprocess.run(["ps", "-o", "args=", "--ppid", str(proc.pid)], capture_output=True, text=True)
        assert "prometheus" in ps.stdout and "--web.enable-lifecycle" not in ps.stdout
    finally:
        stop(proc)
    assert proc.returncode == 0  # SIGTERM: it stopped its server and ended cleanly


def test_enable_lifecycle_flag_turns_it_on(tmp_path):
    proc, url = monitor(tmp_path, "--enable-lifecycle")
    try:
        assert status(f"{url}/-/reload", "POST") == 200
    finally:
        stop(proc)
    assert proc.returncode == 0
