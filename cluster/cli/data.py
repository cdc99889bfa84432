"""`vlm data ...`: ingest, score, filter and inspect webdataset shard directories."""
from __future__ import annotations

import contextlib
import json
import os
import sys

from data_pipeline.config import FilterConfig, ScoreConfig
from vlm.config import ConfigError, load_config

_STATUS_HELP = ("one row per input row in {id}.parquet: status success|failed and a reason "
                "(see docs/data.md for the table of reasons)")


def add_data_commands(sub, config_args) -> None:
    data = sub.add_parser("data", help="data pipeline commands",
                          description="ingest -> score -> filter -> (train); inspect any shard directory. "
                          "See docs/data.md.").add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    _add_ingest(data, config_args)
    _add_score(data, config_args)
    _add_filter(data, config_args)
    _add_inspect(data)


def _add_ingest(data, config_args) -> None:
    p = data.add_parser("ingest", help="download and filter a URL+caption table into webdataset shards",
                        description="Streams the table in shards of data.ingest.shard_size rows, one task "
                        "per shard with a bounded thread pool, on local processes (--processes; the default) "
                        "or on Ray (--ray-address, or --backend ray for a private local Ray); writes "
                        "{id}.tar, {id}.parquet and {id}_stats.json (last: the commit) per shard; "
                        "a rerun skips committed shards. "
                        "Settings: data.ingest.* and data.ingest.fetch.* of the config (--set to override); "
                        "no model section is needed. Images are stored at data.ingest.image_size px (default "
                        "256, whatever the model's input: training and evaluation resize and centre-crop them). "
                        "Before any worker starts, the table's columns are checked (from its head) and a probe file "
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
    p.add_argument("--ray-address", metavar="ADDR",
                   help="run the shard tasks on this Ray cluster (implies --backend ray; so does RAY_ADDRESS)")
    p.add_argument("--backend", choices=("local", "ray"),
                   help="local: shard tasks on --processes local processes, no Ray (the default without "
                   "--ray-address or RAY_ADDRESS; starts in under a second); ray: on Ray (--ray-address, "
                   "else a private local instance, which takes seconds to start and stop)")
    p.add_argument("--processes", type=_positive_int, metavar="N",
                   help="with --backend local: shard tasks at once (default: the CPUs this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--metrics-port", type=int, default=9300, metavar="N",
                   help="serve vlm_ingest_* Prometheus metrics on 127.0.0.1:N while ingesting "
                   "(default 9300; 0: any free port; -1: off); announced in $VLM_METRICS_SD_DIR when set")
    config_args(p)
    p.set_defaults(func=cmd_ingest)


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _default(model, field: str, section: str) -> str:
    """"default: data.SECTION.FIELD, VALUE" for a flag's help; the value is the config's."""
    value = model.model_fields[field].default
    return f"default: data.{section}.{field}, {'none' if value is None else value}"


def _add_score(data, config_args) -> None:
    p = data.add_parser("score", help="perceptual hash and CLIP score of every sample of a shard directory",
                        description="One Ray actor per GPU (else per 2 CPUs) scores whole shards in batches: "
                        "writes {id}_scores.parquet (key, shard, caption, width, height, phash, clip_score) "
                        "per committed shard; a rerun skips scored shards. Settings: data.score.* of the "
                        "config; each flag given overrides its setting.")
    p.add_argument("shards", metavar="SHARD_DIR", help="committed shards (local or s3://)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="run or checkpoint dir of a CLIP model trained by this system (data.score.checkpoint); "
                   "without one only the perceptual hash is computed")
    p.add_argument("--output", metavar="DIR", help="where the score files go (default: SHARD_DIR)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help=f"samples per model call ({_default(ScoreConfig, 'batch_size', 'score')})")
    p.add_argument("--actors", type=int, metavar="N",
                   help=f"scoring actors, 0: one per GPU, else one per 2 CPUs ({_default(ScoreConfig, 'actors', 'score')})")
    p.add_argument("--hash-size", type=int, metavar="N",
                   help=f"pHash of N*N bits ({_default(ScoreConfig, 'hash_size', 'score')})")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: a local instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    config_args(p)
    p.set_defaults(func=cmd_score)


def _add_filter(data, config_args) -> None:
    p = data.add_parser("filter", help="apply rules to the scores and write a new, balanced shard set",
                        description="Rules in order: --min-clip-score, near-duplicate removal (pHash "
                        "Hamming distance <= --near-dup-distance; the best-scored copy stays), "
                        "--top-fraction. Writes balanced shards (sizes differ by at most one) with each "
                        "kept sample's clip_score and phash added to its json, manifest.parquet (every "
                        "sample: kept, reason, detail, output shard) and manifest.json (last). Settings: "
                        "data.filter.* of the config; each flag given overrides its setting.")
    p.add_argument("shards", metavar="SHARD_DIR", help="scored committed shards")
    p.add_argument("--output", required=True, metavar="DIR", help="new shard directory (must not hold shards)")
    p.add_argument("--scores", metavar="DIR", help="where the score files are (default: SHARD_DIR)")
    p.add_argument("--min-clip-score", type=float, metavar="X",
                   help=f"drop samples scoring below X ({_default(FilterConfig, 'min_clip_score', 'filter')})")
    p.add_argument("--top-fraction", type=float, metavar="F",
                   help=f"keep the best fraction F, 0 < F <= 1 ({_default(FilterConfig, 'top_fraction', 'filter')})")
    p.add_argument("--near-dup-distance", type=int, metavar="BITS",
                   help="pHashes within BITS are near-duplicates, -1: keep them all "
                   f"({_default(FilterConfig, 'near_dup_distance', 'filter')})")
    p.add_argument("--shard-size", type=int, metavar="N",
                   help=f"target samples per shard ({_default(FilterConfig, 'shard_size', 'filter')})")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: a local instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    config_args(p)
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
    if args.retry_reasons and not args.retry_failed:
        raise SystemExit("vlm data ingest: --retry-reasons needs --retry-failed")
    backend = ingest_backend(args)
    if backend == "local":  # the workers' start-up (imports) overlaps the driver's and its checks
        from data_pipeline.ingest.runners import prestart_local

        prestart_local()
    from data_pipeline.config import InputError
    from data_pipeline.ingest.driver import ShardFailed, preflight

    cfg = load_config(args.config, args.overrides)
    try:  # before any worker starts: a missing column or an unwritable --output fails in a second
        if not preflight(args.input, args.output, cfg.data.ingest):
            return 0
        summary = _run_ingest(args, cfg, backend)
    except InputError as e:
        raise ConfigError(f"data ingest: {e}") from None
    except ShardFailed as e:
        print(f"vlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the workers are stopped; a shard they left has no committed files
        print(f"\nvlm data ingest: interrupted; the shards committed in {args.output} are kept, and the "
              "same command continues with the others", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


def ingest_backend(args) -> str:
    """"local" or "ray", from --backend, --ray-address and RAY_ADDRESS; exits on a clash."""
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if args.backend == "local" and address:
        raise SystemExit(f"vlm data ingest: --backend local runs without Ray, but a Ray address is given "
                         f"({'--ray-address' if args.ray_address else 'RAY_ADDRESS'}={address})")
    backend = args.backend or ("ray" if address else "local")
    if args.processes is not None and backend == "ray":
        raise SystemExit("vlm data ingest: --processes is for --backend local (Ray runs one task per CPU)")
    return backend


def _run_ingest(args, cfg, backend: str):
    from cluster.ray.session import ray_session
    from data_pipeline.ingest.driver import ingest

    with contextlib.ExitStack() as stack:
        metrics = None
        if args.metrics_port >= 0:
            from data_pipeline.metrics import IngestMetrics

            metrics = stack.enter_context(IngestMetrics(run=cfg.name, port=args.metrics_port))
            metrics.write_target()
            print(f"ingest metrics at {metrics.url}", flush=True)
        processes = None
        if backend == "ray":  # lean: a local instance has no dashboard and no runtime_env (no Ray Train here)
            stack.enter_context(ray_session(args.ray_address, lean=True))
        else:
            processes = args.processes or len(os.sched_getaffinity(0))
        return ingest(args.input, args.output, cfg.data.ingest, processes=processes,
                      progress=not args.no_progress, metrics=metrics,
                      retry_failed=args.retry_failed, retry_reasons=args.retry_reasons, checked=True)


SCORE_FLAGS = ("checkpoint", "batch_size", "actors", "hash_size")
FILTER_FLAGS = ("min_clip_score", "top_fraction", "near_dup_distance", "shard_size")


def _settings(args, section: str, flags: tuple[str, ...]):
    """data.SECTION of the config (--config, --set) with each flag that was given on top."""
    current = getattr(load_config(args.config, args.overrides).data, section)
    given = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    return type(current).model_validate({**current.model_dump(), **given})


def score_config(args) -> ScoreConfig:
    return _settings(args, "score", SCORE_FLAGS)


def filter_config(args) -> FilterConfig:
    return _settings(args, "filter", FILTER_FLAGS)


def cmd_score(args) -> int:
    from cluster.ray.session import ray_session
    from data_pipeline.curate.score import score
    from vlm.eval.clip_score import CheckpointClipScorer

    cfg = score_config(args)
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
    from data_pipeline.curate.filter import filter_shards

    cfg = filter_config(args)
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
