"""`vlm report RUN_DIR`: PNG charts and a self-contained HTML page from the run's logs."""
from __future__ import annotations

import json

from cluster.cli.main import main
from vlm.observe.report import eval_series, read_jsonl


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
