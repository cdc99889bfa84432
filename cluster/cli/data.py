"""`vlm data ...`: ingest, score, filter and inspect webdataset shard directories."""
from __future__ import annotations

import contextlib
import json
import os
import sys

from vlm.config import ConfigError, load_config

_STATUS_HELP = ("one row per input row in {id}.parquet: status success|failed and a reason "
                "(see docs/data.md for the table of reasons)")


def add_data_commands(sub, config_args) -> None:
    data = sub.add_parser("data", help="data pipeline commands",
                          description="ingest -> score -> filter -> (train); inspect any shard directory. "
                          "See docs/data.md.").add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    _add_ingest(data, config_args)
    _add_score(data)
    _add_filter(data)
    _add_inspect(data)


def _add_ingest(data, config_args) -> None:
    p = data.add_parser("ingest", help="download and filter a URL+caption table into webdataset shards",
                        description="Streams the table in shards of data.ingest.shard_size rows, one Ray "
                        "task per shard with a bounded thread pool; writes {id}.tar, {id}.parquet and "
                        "{id}_stats.json (last: the commit) per shard; a rerun skips committed shards. "
                        "Settings: data.ingest.* and data.ingest.fetch.* of the config (--set to override); "
                        "no model section is needed. Images are stored at data.ingest.image_size px (default "
                        "256, whatever the model's input: training and evaluation resize and centre-crop them). "
                        "Before Ray starts, the table's columns are checked (from its head) and a probe file "
                        "is written to --output: a missing column or an unwritable directory exits with status 2; "
                        "an empty table only warns. A shard task is retried (data.ingest.task_retries) only "
                        "for transient errors (network, timeouts), never for a permission error, a full disk "
                        "or bad input. Status: " + _STATUS_HELP + ".")
    p.add_argument("--input", required=True, metavar="TABLE",
                   help="parquet, csv, tsv or jsonl (optionally .gz/.zst...); local path or s3://")
    p.add_argument("--output", required=True, metavar="DIR", help="shard directory; local path or s3://")
    p.add_argument("--retry-failed", action="store_true",
                   help="also revisit committed shards and fetch again only their failed rows whose reason "
                   "is transient (connection_error, timeout, deadline, dns_error, http_5xx, http_408, "
                   "http_429, processing_error) or in --retry-reasons")
    p.add_argument("--retry-reasons", metavar="R1,R2", type=lambda s: frozenset(filter(None, s.split(","))),
                   help="with --retry-failed: the failure reasons to retry instead ('all' for every one)")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: a local instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--metrics-port", type=int, default=9300, metavar="N",
                   help="serve vlm_ingest_* Prometheus metrics on 127.0.0.1:N while ingesting "
                   "(default 9300; 0: any free port; -1: off); announced in $VLM_METRICS_SD_DIR when set")
    config_args(p)
    p.set_defaults(func=cmd_ingest)


def _add_score(data) -> None:
    p = data.add_parser("score", help="perceptual hash and CLIP score of every sample of a shard directory",
                        description="One Ray actor per GPU (else per 2 CPUs) scores whole shards in batches: "
                        "writes {id}_scores.parquet (key, shard, caption, width, height, phash, clip_score) "
                        "per committed shard; a rerun skips scored shards.")
    p.add_argument("shards", metavar="SHARD_DIR", help="committed shards (local or s3://)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="run or checkpoint dir of a CLIP model trained by this system; "
                   "without it only the perceptual hash is computed")
    p.add_argument("--output", metavar="DIR", help="where the score files go (default: SHARD_DIR)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="samples per model call (default 64)")
    p.add_argument("--actors", type=int, default=0, metavar="N",
                   help="scoring actors (default: one per GPU, else one per 2 CPUs)")
    p.add_argument("--hash-size", type=int, default=8, metavar="N", help="pHash of N*N bits (default 8)")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: a local instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)


def _add_filter(data) -> None:
    p = data.add_parser("filter", help="apply rules to the scores and write a new, balanced shard set",
                        description="Rules in order: --min-clip-score, near-duplicate removal (pHash "
                        "Hamming distance <= --near-dup-distance; the best-scored copy stays), "
                        "--top-fraction. Writes balanced shards (sizes differ by at most one) with each "
                        "kept sample's clip_score and phash added to its json, manifest.parquet (every "
                        "sample: kept, reason, detail, output shard) and manifest.json (last).")
    p.add_argument("shards", metavar="SHARD_DIR", help="scored committed shards")
    p.add_argument("--output", required=True, metavar="DIR", help="new shard directory (must not hold shards)")
    p.add_argument("--scores", metavar="DIR", help="where the score files are (default: SHARD_DIR)")
    p.add_argument("--min-clip-score", type=float, metavar="X", help="drop samples scoring below X")
    p.add_argument("--top-fraction", type=float, metavar="F", help="keep the best fraction F (0 < F <= 1)")
    p.add_argument("--near-dup-distance", type=int, default=4, metavar="BITS",
                   help="pHashes within BITS are near-duplicates (default 4; -1: keep them all)")
    p.add_argument("--shard-size", type=int, default=10_000, metavar="N", help="target samples per shard")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: a local instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_filter)


def _add_inspect(data) -> None:
    p = data.add_parser("inspect", help="summary and contact sheet of a shard directory",
                        description="Prints counts by status and failure reason, histograms of original "
                        "image sizes and caption lengths, languages, CLIP-score quantiles (when scored) "
                        "and sample captions; optionally writes the summary as JSON and a contact-sheet PNG.")
    p.add_argument("shards", metavar="SHARD_DIR", help="committed shards (local or s3://)")
    p.add_argument("--contact-sheet", metavar="PNG", help="write a grid of the first images here")
    p.add_argument("--images", type=int, default=36, metavar="N", help="images on the contact sheet (default 36)")
    p.add_argument("--captions", type=int, default=5, metavar="N", help="sample captions to show (default 5)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON here")
    p.set_defaults(func=cmd_inspect)


def cmd_ingest(args) -> int:
    from data_pipeline.config import InputError
    from data_pipeline.ingest.driver import ShardFailed, preflight

    cfg = load_config(args.config, args.overrides)
    if args.retry_reasons and not args.retry_failed:
        raise SystemExit("vlm data ingest: --retry-reasons needs --retry-failed")
    try:  # before any Ray start-up: a missing column or an unwritable --output fails in a second
        if not preflight(args.input, args.output, cfg.data.ingest):
            return 0
        summary = _run_ingest(args, cfg)
    except InputError as e:
        raise ConfigError(f"data ingest: {e}") from None
    except ShardFailed as e:
        print(f"vlm: error: {e}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


def _run_ingest(args, cfg):
    from cluster.ray.session import ray_session
    from data_pipeline.ingest.driver import ingest

    with contextlib.ExitStack() as stack:
        metrics = None
        if args.metrics_port >= 0:
            from data_pipeline.metrics import IngestMetrics

            metrics = stack.enter_context(IngestMetrics(run=cfg.name, port=args.metrics_port))
            metrics.write_target()
            print(f"ingest metrics at {metrics.url}", flush=True)
        if args.ray_address or os.environ.get("RAY_ADDRESS"):
            stack.enter_context(ray_session(args.ray_address))
        # else ingest starts a lean private Ray itself: no dashboard, no torch import
        return ingest(args.input, args.output, cfg.data.ingest, progress=not args.no_progress, metrics=metrics,
                      retry_failed=args.retry_failed, retry_reasons=args.retry_reasons, checked=True)


class CheckpointClipScorer:
    """CLIP score (cosine of the normalised image and caption embeddings) from a checkpoint
    of this system; loads lazily in the process that scores (a Ray actor), on its GPU if any."""

    def __init__(self, path: str, *, verified: bool = False):
        self.path, self.verified = path, verified
        self._loaded = None

    @classmethod
    def resolved(cls, path: str) -> "CheckpointClipScorer":
        """Checks the checkpoint once, here in the driver (a run's corrupt newest one is
        skipped with a warning, a bad path or an explicitly named corrupt checkpoint fails
        naming it, not inside an actor); the actors then load that very checkpoint dir
        without hashing it again."""
        from vlm.checkpoint.store import resolve_verified

        return cls(str(resolve_verified(path).absolute()), verified=True)

    def _load(self):
        import torch

        from vlm.eval.runner import load_eval_model

        model, text, cfg = load_eval_model(self.path, verify_files=not self.verified)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._loaded = (model.to(device), text, cfg.model.vision.image_size, device)

    def __call__(self, samples: list[dict]) -> list[float]:
        import torch

        from vlm.data.batches import decode_image

        if self._loaded is None:
            self._load()
        model, text, size, device = self._loaded
        images = torch.stack([decode_image(s, size) for s in samples]).to(device)
        tokens, eot = text([s.get("txt") or "" for s in samples])
        with torch.no_grad():
            sim = (model.encode_image(images) * model.encode_text(tokens.to(device), eot.to(device))).sum(-1)
        return sim.float().cpu().tolist()

    def __getstate__(self):
        return {"path": self.path, "verified": self.verified, "_loaded": None}  # ship the path, not a model


def cmd_score(args) -> int:
    from cluster.ray.session import ray_session
    from data_pipeline.config import ScoreConfig
    from data_pipeline.curate.score import score

    cfg = ScoreConfig(checkpoint=args.checkpoint, batch_size=args.batch_size, actors=args.actors,
                      hash_size=args.hash_size)
    scorer = None
    if cfg.checkpoint:
        scorer = CheckpointClipScorer.resolved(cfg.checkpoint)
        print(f"checkpoint {scorer.path}", flush=True)
    with ray_session(args.ray_address):
        summary = score(args.shards, cfg, scorer=scorer, output_dir=args.output, progress=not args.no_progress)
    print(summary.format())
    return 0


def cmd_filter(args) -> int:
    from cluster.ray.session import ray_session
    from data_pipeline.config import FilterConfig
    from data_pipeline.curate.filter import filter_shards

    cfg = FilterConfig(min_clip_score=args.min_clip_score, top_fraction=args.top_fraction,
                       near_dup_distance=args.near_dup_distance, shard_size=args.shard_size)
    with ray_session(args.ray_address):
        summary = filter_shards(args.shards, args.output, cfg, scores_dir=args.scores, progress=not args.no_progress)
    print(f"kept {summary['kept']} of {summary['scored']} samples in {len(summary['shard_sizes'])} shard(s) "
          f"of sizes {min(summary['shard_sizes'], default=0)}-{max(summary['shard_sizes'], default=0)}")
    for reason, n in summary["dropped_by_reason"].items():
        print(f"  {reason:<20} {n}")
    print(f"manifest: {args.output.rstrip('/')}/manifest.parquet, manifest.json")
    return 0


def cmd_inspect(args) -> int:
    from data_pipeline.curate.inspect import contact_sheet, format_summary, summarize

    summary = summarize(args.shards, n_captions=args.captions)
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    if args.contact_sheet:
        n, skipped = contact_sheet(args.shards, args.contact_sheet, count=args.images)
        print(f"contact sheet of {n} images: {args.contact_sheet}")
        if skipped:
            print(f"left out {len(skipped)} image(s) that are over the pixel budget or do not decode:")
            print("\n".join(f"  {s}" for s in skipped))
    return 0
