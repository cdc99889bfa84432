"""`vlm data inspect`: what a shard directory holds, and a contact sheet of its images
(named so as not to shadow the standard library's `inspect` when this folder is on sys.path).

The summary comes from the per-shard status tables (``{id}.parquet``) where they exist
(ingest output), else from the stats files (a filtered set): counts by status and failure
reason, histograms of the original image sizes and of caption lengths, languages, score
quantiles when ``*_scores.parquet`` are present, and a few sample captions. The contact
sheet is a PNG grid of the first images with their captions.
"""
from __future__ import annotations

import io
import json
import posixpath
import textwrap
from collections import Counter
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from data_pipeline.config import MAX_PIXELS
from data_pipeline.ingest.codec import Rejected, open_image
from data_pipeline.shards.format import IMAGE_EXTS, atomic_write
from data_pipeline.shards.samples import iter_tar_samples, list_shards

SIZE_EDGES = (0, 64, 128, 256, 512, 1024, 2048, 4096)
WORD_EDGES = (0, 1, 3, 5, 10, 20, 50, 100)


def _histogram(values: list[int], edges: tuple[int, ...]) -> dict[str, int]:
    """Counts per [edge, next edge) bucket, the last one open-ended, labelled '256-511'."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])] + [f">={edges[-1]}"]
    counts = np.bincount(np.searchsorted(edges, values, side="right") - 1, minlength=len(edges))
    return {label: int(n) for label, n in zip(labels, counts)}


def _read_parquets(fs, root: str, names: list[str], columns=None) -> pa.Table | None:
    tables = []
    for name in names:
        with fs.open(f"{root}/{name}", "rb") as f:
            t = pq.read_table(f)
        tables.append(t.select([c for c in columns if c in t.column_names]) if columns else t)
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _original(row: dict, side: str) -> Any:
    """A sample's original size: img2dataset's status tables (and this project's) keep it in
    original_width / original_height, their width / height being the stored image's; this
    project's shards written before it took img2dataset's names kept it in width / height."""
    value = row.get(f"original_{side}")
    return row.get(side) if value is None else value


def _reason(row: dict) -> str:
    """Why a row failed: this project's reason class, else img2dataset's status
    (failed_to_download, failed_to_resize: its error_message is free text)."""
    return row.get("reason") or row.get("status") or "unknown"


def summarize(shard_dir: str, *, n_captions: int = 5) -> dict[str, Any]:
    """The summary as a JSON-ready dict."""
    shards = list_shards(shard_dir)
    fs, root = fsspec.core.url_to_fs(shard_dir)
    names = sorted(posixpath.basename(p) for p in fs.ls(root, detail=False))
    committed = {posixpath.basename(s)[:-4] for s in shards}
    status_names = [n for n in names if n.endswith(".parquet") and n[:-8] in committed]
    score_names = [n for n in names if n.endswith("_scores.parquet") and n[:-15] in committed]
    stats = []
    for s in shards:
        with fs.open(f"{root}/{posixpath.basename(s)[:-4]}_stats.json", "r") as f:
            stats.append(json.load(f))
    out: dict[str, Any] = {"directory": shard_dir, "shards": len(shards)}
    status = _read_parquets(fs, root, status_names,
                            ["status", "reason", "error_message", "width", "height", "original_width",
                             "original_height", "caption", "language"])
    if status is not None:
        rows = status.to_pylist()
        ok = [r for r in rows if r["status"] == "success"]
        out["samples"] = {"total": len(rows), "success": len(ok), "failed": len(rows) - len(ok)}
        out["failures_by_reason"] = dict(Counter(_reason(r) for r in rows if r["status"] != "success").most_common())
        out["original_width"] = _histogram([_original(r, "width") for r in ok], SIZE_EDGES)
        out["original_height"] = _histogram([_original(r, "height") for r in ok], SIZE_EDGES)
        out["caption_words"] = _histogram([len(str(r["caption"]).split()) for r in ok], WORD_EDGES)
        languages = Counter(r.get("language") for r in ok if r.get("language"))
        if languages:
            out["languages"] = dict(languages.most_common(10))
        out["sample_captions"] = [r["caption"] for r in ok[:n_captions]]
    else:
        # this project's stats fields, else img2dataset's (count, successes)
        success = [s.get("success", s.get("successes", 0)) for s in stats]
        out["samples"] = {"total": sum(s.get("total", s.get("count", n)) for s, n in zip(stats, success)),
                          "success": sum(success),
                          "failed": sum(s.get("total", s.get("count", n)) - n for s, n in zip(stats, success))}
        failures: Counter = Counter()
        for s in stats:
            failures.update(s.get("failures_by_reason", {}))
        out["failures_by_reason"] = dict(failures.most_common())
        out["sample_captions"] = [s.get("txt") for s, _ in zip(iter_tar_samples(shards[0]), range(n_captions))]
    scores = _read_parquets(fs, root, score_names, ["clip_score"])
    if scores is not None:
        values = [v for v in scores.column("clip_score").to_pylist() if v is not None]
        out["scored"] = scores.num_rows
        if values:
            q = np.quantile(values, [0, 0.1, 0.5, 0.9, 1])
            out["clip_score_quantiles"] = {k: round(float(v), 4) for k, v in zip(("min", "p10", "p50", "p90", "max"), q)}
    return out


def format_summary(summary: dict[str, Any]) -> str:
    s = summary["samples"]
    lines = [f"{summary['directory']}: {summary['shards']} committed shard(s)",
             f"samples   {s['total']} total, {s['success']} ok, {s['failed']} failed"]
    if summary.get("failures_by_reason"):
        lines.append("failures")
        lines += [f"  {reason:<20} {n}" for reason, n in summary["failures_by_reason"].items()]
    for name in ("original_width", "original_height", "caption_words"):
        if name in summary:
            lines.append(f"{name.replace('_', ' ')} (successes)")
            top = max(summary[name].values()) or 1
            lines += [f"  {label:>10} {n:>8} {'#' * round(30 * n / top)}" for label, n in summary[name].items()]
    if "languages" in summary:
        lines.append("languages " + ", ".join(f"{k} {v}" for k, v in summary["languages"].items()))
    if "clip_score_quantiles" in summary:
        lines.append("clip score " + ", ".join(f"{k} {v}" for k, v in summary["clip_score_quantiles"].items()))
    lines.append("sample captions")
    lines += [f"  {c}" for c in summary["sample_captions"]]
    return "\n".join(lines)


def contact_sheet(shard_dir: str, out_path: str, *, count: int = 36, columns: int = 6, thumb: int = 128,
                  max_pixels: int = MAX_PIXELS) -> tuple[int, list[str]]:
    """A PNG grid of the first ``count`` images with their captions -> (images drawn, the
    images left out as "KEY in SHARD: why"). An image is decoded only within ingest's pixel
    budget (``open_image``); one over it, or one that does not decode, is left out, not fatal."""
    cells, skipped = [], []
    for tar in list_shards(shard_dir):
        for sample in iter_tar_samples(tar):
            data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if data is None:
                continue
            try:
                img = open_image(data, max_pixels)
                img.draft("RGB", (thumb, thumb))  # a JPEG decodes at reduced scale
                img = img.convert("RGB")
            except Rejected as e:
                skipped.append(f"{sample['__key__']} in {tar}: {e.reason} ({e})")
                continue
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
                skipped.append(f"{sample['__key__']} in {tar}: decode_error ({type(e).__name__}: {e})")
                continue
            img.thumbnail((thumb, thumb))
            cells.append((img, sample.get("txt") or sample["__key__"]))
            if len(cells) == count:
                break
        if len(cells) == count:
            break
    if not cells:
        raise ValueError(f"{shard_dir}: no images to draw" + (f" ({len(skipped)} left out: {skipped[0]} ...)"
                                                               if skipped else ""))
    text_h = 36
    rows = -(-len(cells) // columns)
    sheet = Image.new("RGB", (columns * (thumb + 8), rows * (thumb + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(cells):
        x, y = (i % columns) * (thumb + 8) + 4, (i // columns) * (thumb + text_h + 8) + 4
        sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        lines = textwrap.wrap(str(caption), width=thumb // 6)[:3]
        draw.multiline_text((x, y + thumb + 1), "\n".join(lines), fill="black", spacing=0)
    fs, path = fsspec.core.url_to_fs(out_path)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write(fs, path, lambda f: f.write(buf.getvalue()))
    return len(cells), skipped
