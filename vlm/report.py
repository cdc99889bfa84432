"""The demo's closing report: loss and throughput curves from the rank-0 train log."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_train_log(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(log_path: Path, out_png: Path) -> Path:
    recs = read_train_log(log_path)
    if not recs:
        raise ValueError(f"{log_path} holds no training records")
    steps = [r["step"] for r in recs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in sorted(k for k in recs[0] if k.startswith("loss/")):
        ax1.plot(steps, [r[key] for r in recs], label=key.removeprefix("loss/"))
    ax1.set_xlabel("step"), ax1.set_ylabel("loss"), ax1.set_title("training loss"), ax1.legend()
    ax2.plot(steps, [r["samples_per_s"] for r in recs], color="tab:green")
    ax2.set_xlabel("step"), ax2.set_ylabel("samples / s"), ax2.set_title("throughput (global batch)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
