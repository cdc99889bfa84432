"""The demo's recipe: corpus, loopback ingestion, training, evaluation and report, in one run directory.

It imports nothing from cluster/: the caller (cluster/cli/demo.py) hands in how to start
Ray (`ray_session`) and how to train (`train`)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, ContextManager

from demo.config import DemoConfig, save_demo_config
from demo.corpus import Corpus
from vlm.config import RunConfig, dump_config


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _fresh_run_dir(cfg: RunConfig, demo: DemoConfig, overwrite: bool) -> Path:
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{run_dir} is not empty: pass --overwrite to replace the previous "
                                  f"demo, or --set run_dir=ANOTHER_DIR")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    save_demo_config(run_dir, demo)
    return run_dir


def _ingest_splits(cfg: RunConfig, demo: DemoConfig, corpus: Corpus, run_dir: Path) -> None:
    """Serves the corpus on 127.0.0.1 and ingests both splits with Ray (Ray already up)."""
    from data_pipeline.ingest.driver import ingest
    from demo.server import ImageServer
    from demo.tables import write_url_table

    with ImageServer(run_dir / "corpus") as server:
        _banner(f"2/5 ingesting from {server.url} with Ray")
        for split, out in (("train", cfg.data.train_shards), ("heldout", cfg.data.eval_shards)):
            table = run_dir / f"{split}_urls.parquet"
            write_url_table(corpus, server.url, table, split=split,
                            include_broken=demo.corpus.broken_urls and split == "train", regions=True)
            summary = ingest(str(table), cfg.path(out), cfg.data.ingest, progress=True)
            print(f"-- {split} split -> {cfg.path(out)}")
            print(summary.format(), flush=True)


def _evaluate(cfg: RunConfig, corpus: Corpus, run_dir: Path) -> dict:
    """The held-out figures of the run's verified newest checkpoint, dense prediction on the
    corpus's own held-out mask table (ingestion keeps no masks)."""
    from demo.tables import write_mask_table
    from vlm.checkpoint.resolve import resolve_verified
    from vlm.eval.load import load_eval_model
    from vlm.eval.runner import evaluate_model

    used = resolve_verified(str(run_dir))  # hashed once; the results name the one used
    model, text, trained_cfg = load_eval_model(str(used), verify_files=False)
    size = trained_cfg.model.vision.image_size
    results = {"checkpoint": str(used),
               **evaluate_model(model, text, trained_cfg.eval, cfg.path(cfg.data.eval_shards), image_size=size)}
    dense = evaluate_model(model, text, trained_cfg.eval, str(write_mask_table(corpus, "heldout")),
                           image_size=size, tasks=["dense"])
    results["dense"], results["dense_dataset"] = dense["dense"], dense["dataset"]
    return results


def run(cfg: RunConfig, demo: DemoConfig, *, ray_session: Callable[..., ContextManager],
        train: Callable[[RunConfig], None], overwrite: bool = False, config_path: str | None = None) -> int:
    """The whole demo. `ray_session(num_cpus=N)` starts (and afterwards stops) a local Ray;
    `train(cfg)` trains the run on it."""
    from demo.corpus import generate_corpus
    from vlm.data.tokenizer import prepare_tokenizer
    from vlm.eval.runner import format_results
    from vlm.observe.report import write_report

    run_dir = _fresh_run_dir(cfg, demo, overwrite)
    _banner(f"1/5 generating {demo.corpus.num_train} training and {demo.corpus.num_heldout} "
            f"held-out images (seed {demo.corpus.seed})")
    t0 = time.perf_counter()
    corpus = generate_corpus(demo.corpus, run_dir / "corpus")
    print(f"   done in {time.perf_counter() - t0:.1f}s: {run_dir / 'corpus'}")

    with ray_session(num_cpus=max(2, cfg.train.num_workers)):
        _ingest_splits(cfg, demo, corpus, run_dir)
        prepare_tokenizer(cfg)
        _banner(f"3/5 training: ZeRO-{cfg.train.zero_stage} on {cfg.train.num_workers} Ray Train workers, "
                f"{cfg.train.steps} steps of {cfg.train.micro_batch_size * cfg.train.num_workers} samples")
        t_train = time.perf_counter()
        train(cfg)

    _banner("4/5 evaluating on the held-out (colour, shape) combinations")
    results = _evaluate(cfg, corpus, run_dir)
    train_eval_s = time.perf_counter() - t_train
    (run_dir / "eval_results.json").write_text(json.dumps(results, indent=1))

    _banner("5/5 report")
    png, page = write_report(run_dir)
    print(format_results(results))
    print(f"train+eval seconds: {train_eval_s:.1f}")
    print(f"run directory: {run_dir}")
    print(f"curves: {png} (and {page})")
    config = f"--config {config_path} " if config_path else ""
    print(f"resume with: vlm train {config}--set run_dir={cfg.run_dir} --resume latest")
    return 0
