"""`vlm demo`: the walking skeleton on one machine, every flow with its real component."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from vlm.config import RunConfig, dump_config


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_demo(cfg: RunConfig, *, overwrite: bool = False, config_path: str | None = None) -> int:
    from vlm.data.tokenizer import prepare_tokenizer
    from cluster.ray.train import run_training
    from cluster.ray.session import ray_session
    from data_pipeline.ingest.driver import ingest
    from demo.server import ImageServer
    from demo.corpus import generate_corpus, write_mask_table, write_url_table
    from vlm.checkpoint import store as checkpoint
    from vlm.eval.runner import evaluate_model, format_results, load_eval_model
    from vlm.observe.report import write_report

    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{run_dir} is not empty: pass --overwrite to replace the previous "
                                  f"demo, or --set run_dir=ANOTHER_DIR")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))

    _banner(f"1/5 generating {cfg.data.corpus.num_train} training and {cfg.data.corpus.num_heldout} "
            f"held-out images (seed {cfg.data.corpus.seed})")
    t0 = time.perf_counter()
    corpus = generate_corpus(cfg.data.corpus, run_dir / "corpus")
    print(f"   done in {time.perf_counter() - t0:.1f}s: {run_dir / 'corpus'}")

    with ray_session(num_cpus=max(2, cfg.train.num_workers)):
        with ImageServer(run_dir / "corpus") as server:
            _banner(f"2/5 ingesting from {server.url} with Ray")
            for split, out in (("train", cfg.data.train_shards), ("heldout", cfg.data.eval_shards)):
                table = run_dir / f"{split}_urls.parquet"
                write_url_table(corpus, server.url, table, split=split,
                                include_broken=cfg.data.corpus.broken_urls and split == "train", regions=True)
                summary = ingest(str(table), cfg.path(out), cfg.data.ingest, progress=True)
                print(f"-- {split} split -> {cfg.path(out)}")
                print(summary.format(), flush=True)

        prepare_tokenizer(cfg)
        _banner(f"3/5 training: ZeRO-{cfg.train.zero_stage} on {cfg.train.num_workers} Ray Train workers, "
                f"{cfg.train.steps} steps of {cfg.train.micro_batch_size * cfg.train.num_workers} samples")
        t_train = time.perf_counter()
        run_training(cfg)

    _banner("4/5 evaluating on the held-out (colour, shape) combinations")
    used = checkpoint.resolve_verified(str(run_dir))  # hashed once; the results name the one used
    model, text, trained_cfg = load_eval_model(str(used), verify_files=False)
    size = trained_cfg.model.vision.image_size
    results = {"checkpoint": str(used),
               **evaluate_model(model, text, trained_cfg.eval, cfg.path(cfg.data.eval_shards), image_size=size)}
    # ingestion keeps no masks, so dense prediction reads the corpus's own held-out table
    dense = evaluate_model(model, text, trained_cfg.eval, str(write_mask_table(corpus, "heldout")),
                           image_size=size, tasks=["dense"])
    results["dense"], results["dense_dataset"] = dense["dense"], dense["dataset"]
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
