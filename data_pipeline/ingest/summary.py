"""What one ingest run did: ``IngestSummary``, its counts and its printed form."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class IngestSummary:
    """What one ``ingest`` run did; sample counts cover the shards written by this run."""

    shards_total: int = 0
    shards_skipped: int = 0
    shards_written: int = 0
    samples_success: int = 0
    samples_failed: int = 0
    samples_fetched: int = 0
    failures_by_reason: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0
    driver_peak_rss_bytes: int = 0

    def add(self, stats: dict) -> None:
        if stats.get("skipped"):
            self.shards_skipped += 1
            return
        self.shards_written += 1
        self.samples_success += stats["success"]
        self.samples_failed += stats["failed"]
        self.samples_fetched += stats.get("fetched", stats["total"])
        self.failures_by_reason.update(stats["failures_by_reason"])

    def format(self) -> str:
        total = self.samples_success + self.samples_failed
        pct = 100.0 * self.samples_failed / total if total else 0.0
        rate = self.samples_fetched / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"shards    {self.shards_total} total, {self.shards_skipped} skipped, "
            f"{self.shards_written} written",
            f"samples   {self.samples_success} ok, {self.samples_failed} failed ({pct:.1f}%), "
            f"{self.samples_fetched} processed now",
        ]
        for reason, n in self.failures_by_reason.most_common():
            lines.append(f"  {reason:<20} {n}")
        lines.append(f"elapsed   {self.elapsed_s:.1f} s ({rate:.1f} samples/s)")
        lines.append(f"driver    peak RSS {self.driver_peak_rss_bytes / 2**20:.0f} MiB")
        return "\n".join(lines)
