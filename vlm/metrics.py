"""Prometheus exporter of one training worker.

Names follow DESIGN.md: `vlm_` prefix, base units, counters end in `_total`, labels
bounded to run/rank/objective."""
from __future__ import annotations

import json
import os
import socket

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


class TrainMetrics:
    def __init__(self, *, run: str, rank: int, host: str, port: int, objectives: list[str]):
        self.registry = CollectorRegistry()
        labels = ["run", "rank"]
        r = self.registry
        self._samples = Counter("vlm_train_samples_total", "Training samples consumed", labels, registry=r)
        self._steps = Counter("vlm_train_steps_total", "Optimizer steps taken", labels, registry=r)
        self._loss = Gauge("vlm_train_loss", "Latest loss by objective (total = weighted sum)",
                           labels + ["objective"], registry=r)
        self._lr = Gauge("vlm_train_learning_rate", "Current learning rate", labels, registry=r)
        self._step_s = Histogram("vlm_train_step_duration_seconds", "Wall time of one optimizer step",
                                 labels, buckets=STEP_BUCKETS, registry=r)
        self._wait_s = Histogram("vlm_train_data_wait_seconds", "Time a step waited for its batch",
                                 labels, buckets=STEP_BUCKETS, registry=r)
        self._ckpt_s = Histogram("vlm_checkpoint_save_duration_seconds", "Time training stalled on a save",
                                 labels, buckets=STEP_BUCKETS, registry=r)
        self._throughput = Gauge("vlm_train_samples_per_second", "Samples per second over the last step",
                                 labels, registry=r)
        lv = (run, str(rank))
        self.samples, self.steps, self.lr = self._samples.labels(*lv), self._steps.labels(*lv), self._lr.labels(*lv)
        self.step_s, self.wait_s, self.ckpt_s = self._step_s.labels(*lv), self._wait_s.labels(*lv), self._ckpt_s.labels(*lv)
        self.throughput = self._throughput.labels(*lv)
        self._lv = lv
        for name in [*objectives, "total"]:  # present from the first scrape, before step 1
            self._loss.labels(*lv, name)
        self.server = None
        self.url = None
        if port == 0 or not _port_free(host, port + rank):
            port_for_rank = 0
        else:
            port_for_rank = port + rank
        self.server, _ = start_http_server(port_for_rank, addr=host, registry=self.registry)
        self.url = f"http://{host}:{self.server.server_port}/metrics"

    def set_loss(self, name: str, value: float) -> None:
        self._loss.labels(*self._lv, name).set(value)

    def write_endpoint(self, run_dir: str, rank: int) -> str:
        """Records where this rank serves, so scrapers and tests can find it."""
        d = os.path.join(run_dir, "metrics")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"rank{rank}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"rank": rank, "url": self.url, "pid": os.getpid()}, f)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
