"""deploy/grafana: the dashboards parse, their PromQL parses (promtool), and every metric
they name is one the exporters really emit, taken from a live scrape of each."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from data_pipeline.metrics import IngestMetrics
from vlm.observe.metrics import TrainMetrics

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))
PROMETHEUS_OWN = {"up"}  # series Prometheus itself adds to every target
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}


def scraped_names(url: str) -> set[str]:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return {re.split(r"[{ ]", line, 1)[0] for line in body.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
    """Every series name the two exporters serve once they have seen data, GPU ones included."""
    import torch

    mp = pytest.MonkeyPatch()
    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    mp.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    mp.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
    train = TrainMetrics(run="d", rank=0, host="127.0.0.1", port=0, objectives=["clip_infonce"], flops_per_sample=1e9)
    ingest = IngestMetrics(run="d", port=0)
    try:
        train.record_step(step=1, samples=8, step_s=0.1, wait_s=0.01, lr=1e-3, grad_norm=1.0,
                          losses={"clip_infonce": 1.0, "total": 1.0}, diagnostics={"clip_infonce/temperature": 0.07})
        train.record_checkpoint(1.0)
        train.record_eval({"zeroshot": {"acc1": 0.5}})
        ingest.record_shard({"success": 1, "failed": 1, "failures_by_reason": {"timeout": 1}, "elapsed_s": 1.0})
        return scraped_names(train.url) | scraped_names(ingest.url)
    finally:
        train.close()
        ingest.close()
        mp.undo()


def expressions(dashboard: dict) -> list[str]:
    exprs = [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
        for inner in panel.get("panels", []):  # collapsed rows hold their panels
            exprs += [t["expr"] for t in inner.get("targets", [])]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Identifiers in metric position: not a function (followed by "("), not inside a
    selector's braces, a by/without list or a range's brackets, not a string."""
    e = re.sub(r'"[^"]*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if not e[m.end():].lstrip().startswith("(") and m.group() not in ("and", "or", "unless"):
            names.add(m.group())
    return names


def promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\w+", "x", expr)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_names_only_emitted_metrics(path, emitted):
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    exprs = expressions(dashboard)
    assert len(exprs) >= 10
    used = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        used |= names
        assert names <= emitted | PROMETHEUS_OWN, f"{path.name}: {sorted(names - emitted)} not emitted ({expr})"
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            metric = re.match(r"label_values\(([a-z_:]+)", var["query"]["query"]).group(1)
            assert metric in emitted, f"{path.name}: variable {var['name']} reads {metric}"
    assert len(used) >= 8


def test_dashboard_expressions_parse(tmp_path):
    exe = shutil.which("promtool")
    assert exe, "promtool is not on PATH: run `make install` (Debian's prometheus package)"
    exprs = [promql(e) for path in DASHBOARDS for e in expressions(json.loads(path.read_text()))]
    rules = [{"record": f"dashboard:check_{i}", "expr": e} for i, e in enumerate(exprs)]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run([exe, "check", "rules", str(tmp_path / "rules.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_panel_draws_a_series_per_instance():
    # a bare selector draws one line per scraped instance: a worker restarted on another port
    # would start a second "rank 0" line
    for path in DASHBOARDS:
        for expr in expressions(json.loads(path.read_text())):
            assert not re.match(r"\s*[A-Za-z_:][A-Za-z0-9_:]*\s*\{", expr), f"{path.name}: {expr}"


def panel_expr(dashboard: dict, title: str, target: int = 0) -> str:
    panel = next(p for p in dashboard["panels"] if p.get("title") == title)
    return panel["targets"][target]["expr"].replace("$run", "r").replace("$rank", ".*")


def test_a_short_lived_worker_restarted_on_another_port(tmp_path):
    """Rank 0 serves on port 1 for 2 minutes (its last sample still in the look-back, as when
    its target vanished unscraped), its replacement lives 30 s on port 2 (one scrape, then
    a failed one), the next one serves on port 3: the panels draw one rank, and the restarts
    stat counts both restarts."""
    exe = shutil.which("promtool")
    assert exe, "promtool is not on PATH: run `make install` (Debian's prometheus package)"
    dashboard = json.loads((GRAFANA / "vlm-training.json").read_text())
    # (start time, grad norm, world size): the last worker restarted the group at 1 rank of 2
    series = {"a:1": ("0x8", "1x8", "2x8"), "a:2": ("_x9 135 stale", "_x9 5 stale", "_x9 2 stale"),
              "a:3": ("_x11 165x8", "_x11 2x8", "_x11 1x8")}
    inputs = []
    for instance, (start, grad, world) in series.items():
        labels = f'run="r",rank="0",instance="{instance}",job="vlm"'
        inputs += [{"series": f"vlm_worker_start_time_seconds{{{labels}}}", "values": start},
                   {"series": f"vlm_train_grad_norm{{{labels}}}", "values": grad},
                   {"series": f"vlm_train_world_size{{{labels}}}", "values": world}]
    checks = [(panel_expr(dashboard, "Worker restarts (1h)"), "{}", 2),
              (panel_expr(dashboard, "Gradient norm"), '{rank="0"}', 2),
              (panel_expr(dashboard, "World size"), "{}", 1),
              (panel_expr(dashboard, "World size", target=1), "{}", 1)]
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "15s", "input_series": inputs,
        "promql_expr_test": [{"expr": e, "eval_time": "4m", "exp_samples": [{"labels": lab, "value": v}]}
                             for e, lab, v in checks]}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests))
    out = subprocess.run([exe, "test", "rules", str(tmp_path / "test.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
