"""Prometheus exporter of an ingest run, and the file_sd target files every exporter writes.

Ingest tasks (local or on Ray) live for seconds, too short to be scraped, so the driver exports for
them: it feeds each finished shard's stats (the task's result) into counters and keeps the
queue depth current. Labels stay bounded: `run`, `stage`, `status` and a `reason` folded
into a fixed set (HTTP statuses become their class, anything unforeseen `other`)."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

SHARD_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# Every failure reason ingest (fetch.py, rows.py, shard.py) can produce, with HTTP codes folded by class.
REASONS = frozenset({
    "bad_url", "dns_error", "private_address", "too_large", "deadline", "timeout", "connection_error",
    "robots_optout", "too_many_redirects", "http_3xx", "http_4xx", "http_5xx", "no_caption",
    "caption_too_short", "decode_error", "too_many_pixels", "too_small", "bad_aspect_ratio",
    "processing_error", "empty_body", "too_big", "caption_too_long", "wrong_language", "duplicate",
})
SD_DIR_ENV = "VLM_METRICS_SD_DIR"  # a shared directory a cluster-wide Prometheus watches


def reason_label(reason: str) -> str:
    """A failure reason as a bounded label value."""
    if reason.startswith("http_") and reason[5:].isdigit():
        return f"http_{reason[5]}xx"
    return reason if reason in REASONS else "other"


def target_address(host: str, port: int) -> str:
    """host:port a scraper can reach; a wildcard bind is advertised as this node's name."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_sd_target(path: str, address: str, labels: dict[str, str]) -> str:
    """Writes one Prometheus file_sd target group to `path` atomically (write, then
    rename), so a watching Prometheus never reads half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # not *.json: a file_sd glob must not pick it up
    with open(tmp, "w") as f:
        json.dump([{"targets": [address], "labels": labels}], f)
    os.replace(tmp, path)
    return path


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


class Exporter:
    """One registry served over HTTP plus the file_sd targets announcing it; close()
    withdraws both (a target file left behind means the process died)."""

    def _serve(self, registry: CollectorRegistry, host: str, port: int) -> None:
        if port and not port_free(host, port):
            port = 0  # the preferred port is taken (another run on this machine): any free one
        self.host = host
        self.server, _ = start_http_server(port, addr=host, registry=registry)
        self.port = self.server.server_port
        self.url = f"http://{host}:{self.port}/metrics"
        self._sd_paths: list[str] = []

    def close(self) -> None:
        for path in self._sd_paths:
            remove_quietly(path)
        self._sd_paths = []
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class IngestMetrics(Exporter):
    """Serves `vlm_ingest_*` on host:port (0: any free port) until close()."""

    def __init__(self, *, run: str, stage: str = "ingest", host: str = "127.0.0.1", port: int = 0):
        self.registry = r = CollectorRegistry()
        base = ["run", "stage"]
        self._samples = Counter("vlm_ingest_samples_total", "Input rows processed, by outcome",
                                base + ["status", "reason"], registry=r)
        self._downloaded = Counter("vlm_ingest_downloaded_bytes_total", "Bytes downloaded", base, registry=r)
        self._written = Counter("vlm_ingest_written_bytes_total", "Bytes of shard tars written", base, registry=r)
        self._shards = Counter("vlm_ingest_shards_total", "Shards finished: committed now or skipped as "
                               "already committed", base + ["status"], registry=r)
        self._queue = Gauge("vlm_ingest_queue_depth", "Shards waiting to be submitted", base, registry=r)
        self._in_flight = Gauge("vlm_ingest_tasks_in_flight", "Shard tasks running or scheduled", base, registry=r)
        self._shard_s = Histogram("vlm_ingest_shard_duration_seconds", "Wall time of one shard task", base,
                                  buckets=SHARD_BUCKETS, registry=r)
        self._last_commit = Gauge("vlm_ingest_last_commit_timestamp_seconds", "Unix time of the newest "
                                  "shard commit (the exporter's start before the first)", base, registry=r)
        self.run, self.stage = run, stage
        self._lv = (run, stage)
        self._samples.labels(*self._lv, "success", "none")
        for status in ("committed", "skipped"):
            self._shards.labels(*self._lv, status)
        for metric in (self._downloaded, self._written, self._queue, self._in_flight, self._shard_s):
            metric.labels(*self._lv)
        self._last_commit.labels(*self._lv).set(time.time())
        self._serve(r, host, port)

    def record_shard(self, stats: dict) -> None:
        """One finished shard task's stats (ingest_shard's return value)."""
        lv = self._lv
        if stats.get("skipped"):
            self._shards.labels(*lv, "skipped").inc()
            return
        self._shards.labels(*lv, "committed").inc()
        self._samples.labels(*lv, "success", "none").inc(stats["success"])
        folded: dict[str, int] = {}
        for reason, n in stats.get("failures_by_reason", {}).items():
            label = reason_label(reason)
            folded[label] = folded.get(label, 0) + n
        for label, n in folded.items():
            self._samples.labels(*lv, "failed", label).inc(n)
        self._downloaded.labels(*lv).inc(stats.get("bytes_downloaded", 0))
        self._written.labels(*lv).inc(stats.get("bytes_written", 0))
        if "elapsed_s" in stats:
            self._shard_s.labels(*lv).observe(stats["elapsed_s"])
        self._last_commit.labels(*lv).set(time.time())

    def set_queue(self, *, queued: int, in_flight: int) -> None:
        self._queue.labels(*self._lv).set(queued)
        self._in_flight.labels(*self._lv).set(in_flight)

    def write_target(self, sd_dir: str | None = None) -> list[str]:
        """Announces this exporter as a file_sd target in `sd_dir` and in $VLM_METRICS_SD_DIR
        (when set); close() removes the files again."""
        labels = {"run": self.run, "stage": self.stage}
        name = f"ingest-{self.run}-{self.stage}-{os.getpid()}.json"
        for d in filter(None, {sd_dir, os.environ.get(SD_DIR_ENV)}):
            self._sd_paths.append(write_sd_target(os.path.join(d, name), target_address(self.host, self.port), labels))
        return list(self._sd_paths)

