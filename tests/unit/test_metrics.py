"""The training and ingest exporters: names, labels, values, discovery files, bounded labels."""
from __future__ import annotations

import json
import math
import urllib.request

import pytest

from data_pipeline.metrics import IngestMetrics, reason_label
from vlm.observe.metrics import MAX_EVAL_SERIES, TrainMetrics, eval_figures


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


@pytest.fixture
def metrics(tmp_path):
    m = TrainMetrics(run="r1", rank=1, host="127.0.0.1", port=0, objectives=["clip_infonce", "siglip"], world_size=3)
    yield m
    m.close()


def test_record_step_sets_every_training_series(metrics):
    assert metrics.url.startswith("http://127.0.0.1:")
    before = scrape(metrics.url)
    lv = 'rank="1",run="r1"'
    assert before[f'vlm_train_loss{{objective="siglip",{lv}}}'] == 0  # present before step 1
    assert before[f"vlm_train_world_size{{{lv}}}"] == 3
    for step in (1, 2):
        metrics.record_step(step=step, samples=8, step_s=0.5, wait_s=0.1, lr=1e-3, grad_norm=2.5,
                            losses={"clip_infonce": 2.0, "siglip": 1.0, "total": 2.5}, skipped=step == 2,
                            diagnostics={"clip_infonce/temperature": 0.07, "siglip/bias": -10.0})
    m = scrape(metrics.url)
    assert m[f"vlm_train_steps_total{{{lv}}}"] == 2 and m[f"vlm_train_samples_total{{{lv}}}"] == 16
    assert m[f"vlm_train_skipped_steps_total{{{lv}}}"] == 1 and m[f"vlm_train_step{{{lv}}}"] == 2
    assert m[f"vlm_train_samples_per_second{{{lv}}}"] == 16 and m[f"vlm_train_grad_norm{{{lv}}}"] == 2.5
    assert m[f'vlm_train_temperature{{objective="clip_infonce",{lv}}}'] == pytest.approx(0.07)
    assert not any(k.startswith("vlm_train_temperature") and "siglip" in k for k in m)  # the bias is no temperature
    assert m[f"vlm_train_step_duration_seconds_count{{{lv}}}"] == 2
    assert m[f"vlm_train_data_wait_seconds_sum{{{lv}}}"] == pytest.approx(0.2)
    last_step = f"vlm_train_last_step_timestamp_seconds{{{lv}}}"
    assert m[last_step] > before[last_step]
    assert m[f"vlm_process_resident_memory_bytes{{{lv}}}"] > 10e6
    assert not any(k.startswith(("vlm_gpu_", "vlm_train_model_flops")) for k in m)  # no GPU here


def test_checkpoint_eval_and_nan_loss(metrics):
    t0 = scrape(metrics.url)['vlm_checkpoint_last_success_timestamp_seconds{rank="1",run="r1"}']
    metrics.record_checkpoint(1.5)
    metrics.record_checkpoint(3.0, ok=False)
    metrics.record_step(step=3, samples=4, step_s=0.1, wait_s=0.0, lr=1e-3, losses={"total": float("nan")})
    metrics.record_eval({"step": 40, "time": 1.0, "checkpoint": "x", "num_images": 48,
                         "zeroshot": {"acc1": 0.5, "classnames": ["a"], "per_class": {"a": 1.0}},
                         "retrieval": {"image_retrieval_recall@1": 0.25}})
    m = scrape(metrics.url)
    lv = 'rank="1",run="r1"'
    assert m[f"vlm_checkpoint_save_duration_seconds_count{{{lv}}}"] == 1
    assert m[f"vlm_checkpoint_failures_total{{{lv}}}"] == 1
    assert m[f"vlm_checkpoint_last_success_timestamp_seconds{{{lv}}}"] >= t0
    assert math.isnan(m[f'vlm_train_loss{{objective="total",{lv}}}'])
    evals = {k: v for k, v in m.items() if k.startswith("vlm_eval_metric")}
    assert evals == {f'vlm_eval_metric{{metric="acc1",{lv},task="zeroshot"}}': 0.5,
                     f'vlm_eval_metric{{metric="image_retrieval_recall@1",{lv},task="retrieval"}}': 0.25,
                     f'vlm_eval_metric{{metric="num_images",{lv},task="summary"}}': 48}
    assert m[f"vlm_eval_step{{{lv}}}"] == 40


def test_flat_eval_results_split_into_task_and_metric():
    flat = {"zeroshot/acc1": 0.5, "dense/dense_miou": 0.25, "num_images": 48}
    assert eval_figures(flat) == [("zeroshot", "acc1", 0.5), ("dense", "dense_miou", 0.25), ("summary", "num_images", 48)]


def test_eval_labels_are_capped():
    many = {"t": {f"m{i}": 0.5 for i in range(500)}, "bad": float("inf")}
    assert len(eval_figures(many)) == MAX_EVAL_SERIES


def test_file_sd_target_written_and_removed_on_close(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    monkeypatch.setenv("VLM_METRICS_SD_DIR", str(shared))
    m = TrainMetrics(run="r2", rank=0, host="127.0.0.1", port=0, objectives=["clip_infonce"])
    try:
        m.write_endpoint(str(tmp_path), 0)
        endpoint = json.loads((tmp_path / "metrics" / "rank0.json").read_text())
        assert endpoint["url"] == m.url
        for path in (tmp_path / "metrics" / "targets" / "rank0.json", shared / "train-r2-rank0.json"):
            assert json.loads(path.read_text()) == [{"targets": [f"127.0.0.1:{m.port}"],
                                                     "labels": {"run": "r2", "rank": "0"}}]
        assert not list((tmp_path / "metrics" / "targets").glob("*.tmp"))
    finally:
        m.close()
    assert not list((tmp_path / "metrics" / "targets").iterdir()) and not list(shared.iterdir())
    assert (tmp_path / "metrics" / "rank0.json").is_file()  # the endpoint record stays


def test_gpu_memory_and_mfu_when_cuda_is_present(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 1234)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 4096)
    m = TrainMetrics(run="g", rank=0, host="127.0.0.1", port=0, objectives=["clip_infonce"], flops_per_sample=1e12)
    try:
        m.record_step(step=1, samples=100, step_s=1.0, wait_s=0.0, lr=1e-3, losses={"total": 1.0})
        s = scrape(m.url)
    finally:
        m.close()
    lv = 'rank="0",run="g"'
    assert s[f"vlm_gpu_memory_allocated_bytes{{{lv}}}"] == 1234 and s[f"vlm_gpu_memory_reserved_bytes{{{lv}}}"] == 4096
    # 100 samples/s x 3 x 1 TFLOP over the H100's 989 TFLOP/s bf16 peak
    assert s[f"vlm_train_model_flops_utilization_ratio{{{lv}}}"] == pytest.approx(300e12 / 989e12)


def test_ingest_metrics_from_shard_stats(tmp_path):
    with IngestMetrics(run="ing", port=0) as m:
        m.write_target(str(tmp_path))
        assert json.loads(next(tmp_path.glob("*.json")).read_text())[0]["labels"] == {"run": "ing", "stage": "ingest"}
        m.set_queue(queued=3, in_flight=2)
        m.record_shard({"skipped": True})
        m.record_shard({"success": 10, "failed": 4, "elapsed_s": 2.0, "bytes_downloaded": 5000, "bytes_written": 3000,
                        "failures_by_reason": {"http_404": 1, "http_410": 1, "timeout": 1, "weird_new_thing": 1}})
        s = scrape(m.url)
    assert not list(tmp_path.glob("*.json"))
    lv = 'run="ing",stage="ingest"'
    assert s[f'vlm_ingest_samples_total{{reason="none",{lv},status="success"}}'] == 10
    assert s[f'vlm_ingest_samples_total{{reason="http_4xx",{lv},status="failed"}}'] == 2
    assert s[f'vlm_ingest_samples_total{{reason="other",{lv},status="failed"}}'] == 1
    assert s[f'vlm_ingest_shards_total{{{lv},status="committed"}}'] == 1
    assert s[f'vlm_ingest_shards_total{{{lv},status="skipped"}}'] == 1
    assert s[f"vlm_ingest_downloaded_bytes_total{{{lv}}}"] == 5000
    assert s[f"vlm_ingest_written_bytes_total{{{lv}}}"] == 3000
    assert s[f"vlm_ingest_queue_depth{{{lv}}}"] == 3 and s[f"vlm_ingest_tasks_in_flight{{{lv}}}"] == 2
    assert reason_label("http_503") == "http_5xx" and reason_label("decode_error") == "decode_error"


def test_shard_stats_carry_bytes(tmp_path):
    from data_pipeline.config import FetchConfig, IngestConfig
    from demo.config import CorpusConfig
    from data_pipeline.ingest.shard import ingest_shard
    from demo.server import ImageServer
    from demo.corpus import generate_corpus
    from demo.tables import write_url_table
    from data_pipeline.ingest.table import read_table

    corpus = generate_corpus(CorpusConfig(num_train=6, num_heldout=0, image_size=32), tmp_path / "corpus")
    cfg = IngestConfig(shard_size=16, threads=4, fetch=FetchConfig(deadline_s=2, retries=0,
                                                                   allow_private_hosts=["127.0.0.1"]))
    with ImageServer(corpus.root) as server:
        write_url_table(corpus, server.url, str(tmp_path / "urls.parquet"), split="train", include_broken=False)
        rows = read_table(str(tmp_path / "urls.parquet"), url_col="url", caption_col="caption").to_pylist()
        stats = ingest_shard(rows, 0, str(tmp_path / "out"), cfg)
    assert stats["success"] == 6 and stats["bytes_downloaded"] > 6 * 100
    assert stats["bytes_written"] == (tmp_path / "out" / "00000.tar").stat().st_size
