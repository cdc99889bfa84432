"""Run reports from the rank-0 logs (`vlm report RUN_DIR`, and the demo's closing report):
PNG charts and an HTML page.

A restarted run logs the steps since its checkpoint again (logs written before
vlm.train.steplog.truncate_log still hold both attempts): the report keeps one point per
step, the last record of it, and marks the restarts and the world-size changes.

The run directory may be a URL (s3://bucket/run: vlm.rundir); its report is then written
locally, by default into ./{the run's name}-report/."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

from vlm import rundir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


TRAIN_LOG, EVAL_LOG = "train_log.jsonl", "eval_log.jsonl"  # as written by vlm.train.trainer and vlm.eval.runner


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log (a path or a URL); a torn last line (a run still
    writing) is skipped."""
    try:
        text = rundir.read_text(path)
    except (FileNotFoundError, IsADirectoryError):
        return []
    recs = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            recs.append(rec)
    return recs


def eval_series(recs: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """{"task/metric": [(step, value), ...]} for every evaluation figure between 0 and 1
    (accuracies, recalls, mIoU): counts and sizes would squash them on one axis."""
    from vlm.observe.metrics import eval_figures

    series: dict[str, list[tuple[float, float]]] = {}
    for rec in one_per_step(recs)[0]:
        for task, metric, value in eval_figures(rec):
            series.setdefault(f"{task}/{metric}", []).append((rec["step"], value))
    return {k: v for k, v in sorted(series.items()) if all(0 <= y <= 1 for _, y in v)}


@dataclass(frozen=True)
class Mark:
    """Where the run restarted ("restart") or changed its world size ("resize")."""
    step: float
    kind: str
    text: str


def one_per_step(recs: list[dict]) -> tuple[list[dict], list[Mark]]:
    """The last record of each step (the attempt that went on), in step order, and the marks
    found in file order: a restart where the step goes back or "worker_start" changes, a
    resize where "world_size" changes (rows of older logs have neither)."""
    last: dict[float, dict] = {}
    marks: list[Mark] = []
    for prev, rec in zip([None, *recs], recs):
        if prev is not None:
            marks += _marks(prev, rec)
        last[rec["step"]] = rec
    return [last[s] for s in sorted(last)], marks


def _marks(prev: dict, rec: dict) -> list[Mark]:
    step, out = rec["step"], []
    went_back = step <= prev["step"]
    if went_back or _changed(prev, rec, "worker_start"):
        how = "from" if went_back else "after"
        out.append(Mark(step, "restart", f"restarted at step {step:g} ({how} step {prev['step']:g})"))
    if _changed(prev, rec, "world_size"):
        out.append(Mark(step, "resize", f"world size {prev['world_size']} -> {rec['world_size']} at step {step:g}"))
    return out


def _changed(prev: dict, rec: dict, key: str) -> bool:
    return key in prev and key in rec and prev[key] != rec[key]


# a resize is a wide band under the line of the restart it usually comes with
MARK_STYLE = {"restart": {"color": "black", "linestyle": "--", "linewidth": 1, "zorder": 3},
              "resize": {"color": "tab:purple", "linewidth": 6, "alpha": 0.35, "zorder": 2}}


def _series(recs: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_report(train: list[dict], evals: dict, marks: list[Mark]) -> plt.Figure:
    """The report's four charts over steps (`train` one record per step, see one_per_step),
    each with the marks as vertical lines (gid "restart" or "resize")."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_loss, ax_tput), (ax_wait, ax_eval) = axes
    for key in sorted({k for r in train for k in r if k.startswith("loss/")}):
        ax_loss.plot(*_series(train, key), label=key.removeprefix("loss/"))
    ax_loss.set_title("loss per objective")
    ax_tput.plot(*_series(train, "samples_per_s"), color="tab:green")
    ax_tput.set_title("throughput (samples / s)")
    share = [r for r in train if r.get("step_s") and isinstance(r.get("data_wait_s"), (int, float))]
    ax_wait.plot([r["step"] for r in share], [r["data_wait_s"] / r["step_s"] for r in share], color="tab:red")
    ax_wait.set_ylim(0, 1), ax_wait.set_title("data-wait share of step time")
    for name, pts in evals.items():
        ax_eval.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax_eval.set_ylim(0, 1), ax_eval.set_title("evaluation")
    if not evals:
        ax_eval.text(0.5, 0.5, "no eval_log.jsonl records", ha="center", va="center", transform=ax_eval.transAxes)
    steps = [r["step"] for r in train] + [p[0] for pts in evals.values() for p in pts]
    pad = max((max(steps) - min(steps)) * 0.03, 0.5)
    for ax in axes.flat:
        labelled = set()
        for mark in marks:
            label = mark.kind if ax is ax_loss and mark.kind not in labelled else "_nolegend_"
            labelled.add(mark.kind)
            ax.axvline(mark.step, gid=mark.kind, label=label, **MARK_STYLE[mark.kind])
        ax.set_xlim(min(steps) - pad, max(steps) + pad)  # the same steps on every chart
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _summary(train: list[dict], rows: int, marks: list[Mark]) -> str:
    """What the log holds, each step counted once; samples and bad samples are running
    totals, so the last step's are the run's."""
    import html

    last = train[-1]
    text = f"{len(train)} steps logged, last at step {last['step']:g}"
    if rows > len(train):
        text += f" ({rows - len(train)} more rows are steps a restart ran again: the last of each is kept)"
    totals = [f"{k.replace('_', ' ')} {last[k]:g}" for k in ("samples", "bad_samples")
              if isinstance(last.get(k), (int, float))]
    items = "".join(f"<li>{html.escape(m.text)}</li>" for m in marks)
    return (f"<p>{text}.{' Totals: ' + ', '.join(totals) + '.' if totals else ''}</p>"
            + (f"<h2>Restarts and resizes</h2><ul>{items}</ul>" if marks else ""))


def _html(run_dir: str, png: Path, train: list[dict], evals: dict, summary: str) -> str:
    import base64
    import html

    last = train[-1]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>"
                   for k, v in last.items() if isinstance(v, (int, float)) and k != "worker_start")
    eval_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{pts[-1][1]:.4f}</td><td>{pts[-1][0]:g}</td></tr>"
                        for k, pts in evals.items())
    image = base64.b64encode(png.read_bytes()).decode()
    eval_table = (f"<h2>Latest evaluation</h2><table><tr><th>figure</th><th>value</th><th>step</th></tr>"
                  f"{eval_rows}</table>") if evals else "<p>No evaluation records (eval_log.jsonl).</p>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vlm report: {html.escape(str(run_dir))}"
            f"</title><style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 12px;text-align:left}}"
            f"</style></head><body><h1>Run {html.escape(str(run_dir))}</h1>"
            f"{summary}"
            f"<img alt='training and evaluation curves' src='data:image/png;base64,{image}'>"
            f"<h2>Last training record</h2><table>{rows}</table>{eval_table}</body></html>")


def default_out_dir(run_dir: str | Path) -> Path:
    """Where a report goes unless told: the run directory, or for a remote one (a URL)
    ./{its last path component}-report, on this machine."""
    if not rundir.is_remote(str(run_dir)):
        return Path(run_dir)
    return Path(f"{str(run_dir).rstrip('/').rsplit('/', 1)[-1]}-report")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """report.png (loss per objective, throughput, data-wait share, evaluation figures over
    steps, restarts and resizes marked) and a self-contained report.html embedding it;
    returns both paths (local: see default_out_dir)."""
    run_dir = str(run_dir)
    out_dir = Path(out_dir) if out_dir else default_out_dir(run_dir)
    rows = read_jsonl(rundir.join(run_dir, TRAIN_LOG))
    if not rows:
        raise FileNotFoundError(f"{rundir.join(run_dir, TRAIN_LOG)} is missing or holds no training records")
    train, marks = one_per_step(rows)
    evals = eval_series(read_jsonl(rundir.join(run_dir, EVAL_LOG)))
    out_dir.mkdir(parents=True, exist_ok=True)
    png, page = out_dir / "report.png", out_dir / "report.html"
    fig = plot_report(train, evals, marks)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    page.write_text(_html(run_dir, png, train, evals, _summary(train, len(rows), marks)))
    return png, page
