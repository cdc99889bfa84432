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
    exprs = []
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
        if not e[m.end():].lstrip().startswith("("):
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
