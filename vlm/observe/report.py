"""Run reports from the rank-0 logs (`vlm report RUN_DIR`, and the demo's closing report):
PNG charts and an HTML page."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


TRAIN_LOG, EVAL_LOG = "train_log.jsonl", "eval_log.jsonl"  # as written by vlm.train.trainer and vlm.eval.runner


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a torn last line (a run still writing) is skipped."""
    if not path.is_file():
        return []
    recs = []
    for line in path.read_text().splitlines():
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
    for rec in recs:
        for task, metric, value in eval_figures(rec):
            series.setdefault(f"{task}/{metric}", []).append((rec["step"], value))
    return {k: v for k, v in sorted(series.items()) if all(0 <= y <= 1 for _, y in v)}


def _series(recs: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_report(train: list[dict], evals: dict, out_png: Path) -> None:
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
    for ax in axes.flat:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _html(run_dir: Path, png: Path, train: list[dict], evals: dict) -> str:
    import base64
    import html

    last = train[-1]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>"
                   for k, v in last.items() if isinstance(v, (int, float)))
    eval_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{pts[-1][1]:.4f}</td><td>{pts[-1][0]:g}</td></tr>"
                        for k, pts in evals.items())
    image = base64.b64encode(png.read_bytes()).decode()
    eval_table = (f"<h2>Latest evaluation</h2><table><tr><th>figure</th><th>value</th><th>step</th></tr>"
                  f"{eval_rows}</table>") if evals else "<p>No evaluation records (eval_log.jsonl).</p>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>vlm report: {html.escape(str(run_dir))}"
            f"</title><style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 12px;text-align:left}}"
            f"</style></head><body><h1>Run {html.escape(str(run_dir))}</h1>"
            f"<p>{len(train)} training records, last at step {last['step']:g}.</p>"
            f"<img alt='training and evaluation curves' src='data:image/png;base64,{image}'>"
            f"<h2>Last training record</h2><table>{rows}</table>{eval_table}</body></html>")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """report.png (loss per objective, throughput, data-wait share, evaluation figures over
    steps) and a self-contained report.html embedding it; returns both paths."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    train = read_jsonl(run_dir / TRAIN_LOG)
    if not train:
        raise FileNotFoundError(f"{run_dir / TRAIN_LOG} is missing or holds no training records")
    evals = eval_series(read_jsonl(run_dir / EVAL_LOG))
    out_dir.mkdir(parents=True, exist_ok=True)
    png, page = out_dir / "report.png", out_dir / "report.html"
    _plot_report(train, evals, png)
    page.write_text(_html(run_dir, png, train, evals))
    return png, page
