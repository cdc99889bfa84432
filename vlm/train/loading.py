"""A training rank's loader from the run config: how many data workers, and the batches each makes."""
from __future__ import annotations

import functools

import torch

from data_pipeline.shards.reader import build_reader
from data_pipeline.shards.samples import list_shards
from vlm.config import RunConfig
from vlm.data.batches import BatchLoader
from vlm.data.loader import TrainLoader, default_workers
from vlm.data.tokenizer import TextEncoder
from vlm.train.module import Pretrainer


def make_batches(cfg: RunConfig, text: TextEncoder, needs: frozenset[str], rank: int, world_size: int,
                 worker: int, num_workers: int) -> BatchLoader:
    """The BatchLoader of reader slot (rank, worker) of a run (vlm.data.loader.MakeBatches)."""
    reader = build_reader(cfg.data.reader, cfg.path(cfg.data.train_shards), rank=rank, world_size=world_size,
                          seed=cfg.train.seed, worker=worker, num_workers=num_workers, expand=cfg.path)
    return BatchLoader(reader, text, batch_size=cfg.train.micro_batch_size, image_size=cfg.model.vision.image_size,
                       label_field=cfg.data.label_field, seed=cfg.train.seed, needs=needs,
                       colour=cfg.data.colour_augment, crop=cfg.data.train_crop,
                       max_pixels=cfg.data.ingest.max_pixels, max_bad_ratio=cfg.data.max_bad_sample_ratio,
                       bad_window=cfg.data.bad_sample_window)


def loader_workers(cfg: RunConfig, world_size: int) -> int:
    """data.loader_workers, or when unset default_workers() but no more slots than the
    shards can fill (the reader refuses a slot without a shard, unless it resamples)."""
    if cfg.data.loader_workers is not None:
        return cfg.data.loader_workers
    workers = default_workers()
    if cfg.data.reader.resample:
        return workers
    paths = [cfg.path(m.shards) for m in cfg.data.reader.mix] or [cfg.path(cfg.data.train_shards)]
    fewest = min(len(list_shards(p)) for p in paths)
    return min(workers, fewest // world_size)


def build_loader(cfg: RunConfig, text: TextEncoder, model: Pretrainer, *, rank: int, world_size: int,
                 device: torch.device) -> TrainLoader:
    """This rank's share of the training shards, as the micro-batches `model` needs, made by
    loader_workers() processes (vlm.data.loader)."""
    needs = model.needs | ({"sample_ids"} if cfg.data.log_sample_ids else set())
    make = functools.partial(make_batches, cfg, text, needs, rank, world_size)
    return TrainLoader(make, num_workers=loader_workers(cfg, world_size), device=device,
                       mean=cfg.model.vision.image_mean, std=cfg.model.vision.image_std,
                       views=cfg.data.augment if model.needs_views else None, seed=cfg.train.seed,
                       rank=rank, world_size=world_size, prefetch=cfg.data.prefetch_batches)
