"""`vlm report RUN_DIR`: PNG charts and a self-contained HTML page from the run's logs."""
from __future__ import annotations

import io
import json
import time

import matplotlib.pyplot as plt
import numpy as np
import pytest

from cluster.cli.main import main
from vlm.observe.report import Mark, eval_series, one_per_step, plot_report, read_jsonl
from vlm.train.steplog import WORKER_START, write_step


def _write_logs(run_dir, with_eval=True):
    with open(run_dir / "train_log.jsonl", "w") as f:
        for step in range(10, 110, 10):
            f.write(json.dumps({"step": step, "samples": step * 16, "lr": 1e-3, "step_s": 0.2, "data_wait_s": 0.05,
                                "samples_per_s": 80.0, "clip_infonce/temperature": 0.07,
                                "loss/clip_infonce": 3 - step / 100, "loss/siglip": 2 - step / 100,
                                "loss/total": 4 - step / 50}) + "\n")
        f.write('{"step": 110, "loss/tot')  # a run still writing
    if with_eval:
        with open(run_dir / "eval_log.jsonl", "w") as f:
            for step, acc in ((50, 0.3), (100, 0.6)):
                f.write(json.dumps({"step": step, "time": 1.0 + step, "checkpoint": "x", "num_images": 48,
                                    "zeroshot": {"acc1": acc, "classnames": ["a", "b"]},
                                    "retrieval": {"image_retrieval_recall@1": acc / 2, "num_captions": 96}}) + "\n")


def test_report_cli_writes_png_and_html(tmp_path, capsys):
    _write_logs(tmp_path)
    assert main(["report", str(tmp_path), "--output", str(tmp_path / "out")]) == 0
    png, page = tmp_path / "out" / "report.png", tmp_path / "out" / "report.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    html = page.read_text()
    assert "data:image/png;base64," in html and "zeroshot/acc1" in html and "0.6000" in html
    assert str(page) in capsys.readouterr().out


def test_eval_series_keeps_fractions_only(tmp_path):
    _write_logs(tmp_path)
    series = eval_series(read_jsonl(tmp_path / "eval_log.jsonl"))
    assert series == {"retrieval/image_retrieval_recall@1": [(50, 0.15), (100, 0.3)],
                      "zeroshot/acc1": [(50, 0.3), (100, 0.6)]}
    assert len(read_jsonl(tmp_path / "train_log.jsonl")) == 10  # the torn line is skipped


def test_report_without_eval_log_and_without_train_log(tmp_path, capsys):
    _write_logs(tmp_path, with_eval=False)
    assert main(["report", str(tmp_path)]) == 0
    assert "No evaluation records" in (tmp_path / "report.html").read_text()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "train_log.jsonl is missing" in capsys.readouterr().err


def _row(step, attempt, world_size, worker_start):
    """A row as vlm.train.steplog.write_step writes it; the loss says which attempt ran it."""
    return {"step": step, "samples": step * 16, "lr": 1e-3, "step_s": 0.2, "data_wait_s": 0.05,
            "samples_per_s": 80.0, "grad_norm": 1.0, "loss/total": 4 - step / 10 + attempt,
            "bad_samples": step // 5, "world_size": world_size, "worker_start": worker_start}


def _write_restarted_log(run_dir):
    """Steps 1-12 on 2 workers; a restart on 1 worker from the checkpoint at step 6 (a log
    from before truncation: steps 7-12 twice); then one truncated by a later restart on 1
    worker too (steps 17-20 follow 16, with a new worker_start)."""
    rows = ([_row(s, 0, 2, 100.0) for s in range(1, 13)] + [_row(s, 1, 1, 200.0) for s in range(7, 17)]
            + [_row(s, 2, 1, 300.0) for s in range(17, 21)])
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_restarts_keep_one_point_per_step_and_are_marked(tmp_path):
    rows = _write_restarted_log(tmp_path)
    train, marks = one_per_step(read_jsonl(tmp_path / "train_log.jsonl"))
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["loss/total"] - (4 - r["step"] / 10) for r in train] == pytest.approx([0] * 6 + [1] * 10 + [2] * 4)
    assert marks == [Mark(7, "restart", "restarted at step 7 (from step 12)"),
                     Mark(7, "resize", "world size 2 -> 1 at step 7"),
                     Mark(17, "restart", "restarted at step 17 (after step 16)")]
    fig = plot_report(train, {}, marks)
    try:
        lines = [ln for ax in fig.axes for ln in ax.get_lines()]
        curves = [ln for ln in lines if ln.get_gid() is None]
        assert len(curves) == 3 and all(np.all(np.diff(ln.get_xdata()) > 0) for ln in curves)
        assert all(len(ln.get_xdata()) == 20 for ln in curves)
        assert sorted((ln.get_gid(), ln.get_xdata()[0]) for ln in lines if ln.get_gid()) == \
            sorted([("restart", 7), ("resize", 7), ("restart", 17)] * 4)  # on each of the 4 charts
        assert fig.axes[0].get_legend_handles_labels()[1] == ["total", "restart", "resize"]
    finally:
        plt.close(fig)
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert f"20 steps logged, last at step 20 ({len(rows) - 20} more rows are steps a restart ran again" in page
    assert "Totals: samples 320, bad samples 4." in page
    assert "restarted at step 7 (from step 12)" in page and "world size 2 -&gt; 1 at step 7" in page
    assert "restarted at step 17 (after step 16)" in page and "worker_start" not in page


def test_eval_records_of_a_restart_count_once(tmp_path):
    recs = [{"step": s, "zeroshot": {"acc1": a}} for s, a in ((50, 0.3), (100, 0.5), (50, 0.31), (100, 0.6))]
    (tmp_path / "eval_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert eval_series(read_jsonl(tmp_path / "eval_log.jsonl")) == {"zeroshot/acc1": [(50, 0.31), (100, 0.6)]}


def test_step_rows_name_the_world_size_and_the_worker_start():
    r = {"step_s": 0.5, "wait_s": 0.1, "lr": 1e-3, "grad_norm": 2.0, "losses": {"total": 1.5},
         "diagnostics": {"clip_infonce/temperature": 0.07}}
    out = io.StringIO()
    write_step(out, r, step=3, steps=10, samples_seen=48, global_batch=16, bad={"bad_samples": 0})
    row = json.loads(out.getvalue())
    assert row["world_size"] == 1 and row["worker_start"] == WORKER_START <= time.time()
    assert row["step"] == 3 and row["samples_per_s"] == 32 and row["loss/total"] == 1.5
