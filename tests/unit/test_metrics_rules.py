"""deploy/prometheus: the alert rules check and pass their promtool unit tests (each alert
fires on a bad series and stays quiet on a healthy one); both configs are valid. promtool
is Debian's prometheus package, which `make install` installs: its absence is a failure."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = ["VlmTrainingStalled", "VlmLossNotFinite", "VlmExporterDown", "VlmInputBound", "VlmCheckpointStale",
          "VlmThroughputDropped", "VlmWorkerRestarted", "VlmIngestFailureRateHigh"]


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool is not on PATH: run `make install` (Debian's prometheus package)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_rules_check():
    out = promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout


def test_rule_unit_tests_cover_every_alert():
    tests = (DEPLOY / "tests" / "alerts_test.yml").read_text()
    for name in ALERTS:
        assert tests.count(f"alertname: {name}") >= 2, f"{name}: needs a quiet and a firing case"
    out = promtool("test", "rules", str(DEPLOY / "tests" / "alerts_test.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_deploy_config_is_valid():
    out = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_monitor_config_is_valid(tmp_path):
    from vlm.observe.monitor import write_config

    path = write_config(tmp_path, scrape_interval="1s")
    assert (tmp_path / "metrics" / "targets").is_dir()
    out = promtool("check", "config", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout


@pytest.mark.parametrize("argv", [["monitor", "--help"], ["report", "--help"]])
def test_cli_help(argv, capsys):
    from cluster.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and f"usage: vlm {argv[0]}" in capsys.readouterr().out


def test_monitor_without_binary_says_how_to_install(tmp_path, monkeypatch, capsys):
    from cluster.cli.main import main

    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["monitor", str(tmp_path), "--port", "0", "--for", "1"]) == 1
    assert "make install" in capsys.readouterr().err


def test_monitor_cli_serves_then_stops(tmp_path, capsys):
    from cluster.cli.main import main

    assert main(["monitor", str(tmp_path), "--port", "0", "--for", "1"]) == 0
    out = capsys.readouterr().out
    assert "Prometheus for" in out and "at http://127.0.0.1:" in out
    assert (tmp_path / "monitor" / "data").is_dir()
    assert "Server is ready" in (tmp_path / "monitor" / "prometheus.log").read_text()
