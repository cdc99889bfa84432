"""The tables written from a synthetic corpus: the parquet URL table ingestion reads, and the mask table dense evaluation reads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from demo.corpus import Corpus, render_mask


def write_mask_table(corpus: Corpus, split: str = "heldout") -> Path:
    """Writes ``masks/{split}/{index}.png`` (255 on the shape, 0 elsewhere) and
    ``{split}_eval.csv`` (path, caption, label, mask; paths relative to the corpus root):
    an evaluation set that `vlm eval --task dense` (and every other task) reads."""
    import csv

    root = corpus.root
    (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    table = root / f"{split}_eval.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption", "label", "mask"])
        for record in corpus.split(split):
            mask_path = record["path"].replace("images/", "masks/", 1)
            Image.fromarray(render_mask(corpus, record).astype(np.uint8) * 255).save(root / mask_path)
            writer.writerow([record["path"], record["caption"], f"{record['colour']} {record['shape']}", mask_path])
    return table


def _url_rows(corpus: Corpus, base: str, split: str, regions: bool) -> list[dict]:
    """One row per image of the split."""
    return [
        {
            "url": f"{base}/{r['path']}",
            "caption": r["caption"],
            "colour": r["colour"],
            "shape": r["shape"],
            "label": f"{r['colour']} {r['shape']}",
            "split": r["split"],
            "bbox": list(r["bbox"]),
            **({"regions": r["regions"]} if regions else {}),
        }
        for r in corpus.split(split)
    ]


def _broken_rows(base: str, split: str, regions: bool) -> list[dict]:
    """One row per broken endpoint of the demo's image server."""
    from demo.server import BROKEN_ENDPOINTS

    return [
        {
            "url": f"{base}{endpoint}",
            "caption": f"broken sample ({hint.replace('_', ' ')})",
            "colour": None,
            "shape": None,
            "label": None,
            "split": split,
            "bbox": None,
            **({"regions": None} if regions else {}),
        }
        for hint, endpoint in BROKEN_ENDPOINTS.items()
    ]


def _url_schema(regions: bool):
    import pyarrow as pa

    return pa.schema(
        [
            ("url", pa.string()),
            ("caption", pa.string()),
            ("colour", pa.string()),
            ("shape", pa.string()),
            ("label", pa.string()),  # the class of the sample, for UniCL-style objectives
            ("split", pa.string()),
            ("bbox", pa.list_(pa.int32())),
        ]
        + ([("regions", pa.list_(pa.struct([("box", pa.list_(pa.float64())), ("phrase", pa.string())])))]
           if regions else [])
    )


def write_url_table(
    corpus: Corpus,
    base_url: str,
    path: str,
    *,
    split: str,
    include_broken: bool | None = None,
    regions: bool = False,
) -> int:
    """Write a parquet URL table for one split; returns the number of rows written.

    ``include_broken`` (default: ``corpus.cfg.broken_urls``) appends one row per broken
    endpoint of ``demo.server.ImageServer`` so ingestion meets real failures.
    ``regions`` adds a "regions" column (each row's boxes and phrases, see regions_of),
    which ingestion copies into every sample's metadata for region–word matching.
    """
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = base_url.rstrip("/")
    rows = _url_rows(corpus, base, split, regions)
    if include_broken is None:
        include_broken = corpus.cfg.broken_urls
    if include_broken:
        rows += _broken_rows(base, split, regions)
    table = pa.Table.from_pylist(rows, schema=_url_schema(regions))
    with fsspec.open(path, "wb") as f:
        pq.write_table(table, f)
    return table.num_rows
