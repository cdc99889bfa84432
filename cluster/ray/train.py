"""Runs vlm.train.trainer.train on N Ray Train workers (one per GPU, or per CPU slot).

Failure policy: with max_failures > 0, when a worker process or its node dies Ray Train
tears the group down and starts a new one, whose workers resume from the newest complete
checkpoint (resume="auto"), so a run loses at most the steps since its last save.

Stop channel: the driver cannot signal the workers (they are Ray actors on other
processes, maybe other nodes), so `request_stop` writes a key into Ray's GCS key-value
store, which every worker polls once per step; the workers then save together and end
("stopped"). `run_supervised` (the driver of `vlm train` and of a `vlm cluster submit` job)
sends it on SIGTERM or SIGINT, waits up to train.stop_grace_s for the save, and reads back
the step and checkpoint the workers stopped at, which rank 0 leaves under the same key."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from ray.train import FailureConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from vlm.config import RunConfig
from vlm.train.rendezvous import bound_store, pin_gloo_to

STOP_NAMESPACE = "vlm"
# rank 0's store server, from _serve_store until its process group takes it over
_STORE: dict[str, dist.TCPStore] = {}


class NodeBoundTorchConfig(TorchConfig):
    """Ray Train's TorchConfig, but the process group's store listens on rank 0's node
    address only (127.0.0.1 for a local Ray), where Ray's own would take connections on
    every interface (see vlm/train/rendezvous.py), and gloo listens on the node's address."""

    @property
    def backend_cls(self):
        return _NodeBoundTorchBackend


class _NodeBoundTorchBackend(_TorchBackend):
    """Ray's torch backend with its process group setup replaced: rank 0 starts the store
    on its node address first, then every worker joins it. Shutdown stays Ray's. Written
    against the pinned ray (2.60): it reuses two of ray.train.torch.config's private names."""

    def on_start(self, worker_group, backend_config: TorchConfig):
        timeout_s = backend_config.timeout_s
        host, port = worker_group.execute_single(0, _serve_store, world_size=len(worker_group),
                                                 timeout_s=timeout_s)
        if not isinstance(worker_group, V1WorkerGroup):  # as Ray's backend: Train v1 sets them later
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _join_process_group, backend=backend_config.backend or "gloo",
                                                   host=host, port=port, world_rank=i, world_size=len(worker_group),
                                                   timeout_s=timeout_s)
                 for i in range(len(worker_group))])


def _serve_store(*, world_size: int, timeout_s: int) -> tuple[str, int]:
    # on rank 0's worker: its node's address, as Ray knows it (127.0.0.1 for a local Ray)
    host = ray.util.get_node_ip_address()
    _STORE["server"] = bound_store(host, 0, rank=0, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return host, _STORE["server"].port


def _join_process_group(*, backend: str, host: str, port: int, world_rank: int, world_size: int,
                        timeout_s: int) -> None:
    # world_rank, not rank: the name of execute_single_async's own first argument
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
    pin_gloo_to(ray.util.get_node_ip_address())
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        # as Ray's backend: a timed-out collective fails the worker instead of hanging it
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    store = _STORE.pop("server") if world_rank == 0 else bound_store(host, port, rank=world_rank,
                                                                         world_size=world_size, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def _worker(loop_config: dict) -> None:
    # Runs inside each Ray Train worker, where _NodeBoundTorchBackend has created the process group.
    import ray.train

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    os.environ["RANK"] = str(ctx.get_world_rank())
    os.environ["WORLD_SIZE"] = str(ctx.get_world_size())
    for key, value in loop_config["env"].items():
        os.environ.setdefault(key, value)
    # decided here, on the worker's own node, before anything imports DeepSpeed: the
    # driver may run on a head without GPUs
    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    os.chdir(loop_config["cwd"])
    from vlm.config import config_from_dict
    from vlm.train.trainer import train

    stop_key = loop_config.get("stop_key")
    should_stop = (lambda: stop_requested(stop_key)) if stop_key else None
    resume, starts = _this_start(loop_config, ctx.get_world_rank(), ctx.get_world_size())
    summary = train(config_from_dict(loop_config["config"]), resume=resume, should_stop=should_stop,
                    on_started=((lambda: _kv_put(f"{stop_key}/starts", f"{starts}:{ctx.get_world_size()}"))
                                if stop_key else None))
    if stop_key and summary["rank"] == 0:  # for run_supervised: where the run stopped
        _kv_put(f"{stop_key}/result", json.dumps({k: summary[k] for k in ("step", "stopped", "checkpoint")}))


def _this_start(loop_config: dict, rank: int, world_size: int) -> tuple[str | None, int]:
    """(what to resume, which start of the worker group this is). Every start of the group
    runs the same loop config; the number of the last start that got going, and its size,
    are kept under the stop key (written once the engine is built, after collectives every
    rank joins, so no rank of the first start reads it). A restart, after a failure or an
    elastic resize, resumes the newest checkpoint, never again a tag the first start resumed."""
    stop_key = loop_config.get("stop_key")
    before = _kv_get(f"{stop_key}/starts") if stop_key else None
    if before is None:
        return loop_config["resume"], 1
    starts, _, size = before.partition(":")
    if rank == 0:
        limit = loop_config.get("max_failures", 0)
        why = (f", grown from {size} to {world_size} worker(s)" if size and int(size) < world_size else
               f" after a failure (restart {starts} of {'unlimited' if limit == -1 else limit}), "
               f"{world_size} worker(s)")
        print(f"worker group restarted{why}: resuming from the newest checkpoint", flush=True)
    return "auto", int(starts) + 1


def new_stop_key(name: str) -> str:
    """A key unique to this launch: a stop request of an earlier job of the same run name
    never stops a later one."""
    return f"stop/{name}/{uuid.uuid4().hex}"


def request_stop(stop_key: str) -> None:
    _kv_put(stop_key, "1")


def _kv_put(key: str, value: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value.encode(), namespace=STOP_NAMESPACE)


def _kv_get(key: str) -> str | None:
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(key, namespace=STOP_NAMESPACE)
    return value.decode() if value is not None else None


def stop_requested(stop_key: str) -> bool:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_exists(stop_key, namespace=STOP_NAMESPACE)


def clear_stop(stop_key: str) -> None:
    from ray.experimental import internal_kv

    for key in (stop_key, f"{stop_key}/starts", f"{stop_key}/result"):
        internal_kv._internal_kv_del(key, namespace=STOP_NAMESPACE)


def run_training(cfg: RunConfig, *, resume: str | None = None, max_failures: int = 0,
                 stop_key: str | None = None) -> None:
    """Blocks until every worker has finished; raises if the run failed (after
    max_failures restarts of the worker group; -1: unlimited). resume: None, 'auto',
    'latest' or a tag, for the first start; with a stop_key, a restarted group resumes the
    newest checkpoint ('auto') instead, whatever the first start resumed."""
    from cluster.ray.session import worker_env
    from vlm.rundir import scratch_dir

    # Whether the workers get GPUs is the cluster's business, not the driver's: a job's
    # driver runs on the head, which usually has none.
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if ray.is_initialized() else torch.cuda.is_available()
    if stop_key is None and (max_failures != 0 or cfg.train.elastic) and resume in (None, "latest"):
        # without a stop key every start runs the same loop config: 'auto' starts fresh
        # when there is no checkpoint and resumes the newest one after a restart (or a resize)
        resume = "auto"
    workers = cfg.train.worker_range() if cfg.train.elastic else cfg.train.worker_range()[0]
    # read by Ray Train's controller, to which it passes this variable of the driver's
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{cfg.train.worker_start_timeout_s:g}"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "resume": resume, "max_failures": max_failures,
                           "cwd": os.getcwd(), "env": worker_env(), "stop_key": stop_key},
        torch_config=NodeBoundTorchConfig(backend="nccl" if use_gpu else "gloo"),
        # a [min, max] range is Ray Train's elastic mode: it starts at the size it can
        # place, restarts smaller after a loss and larger when resources return
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1},
                                     elastic_resize_monitor_interval_s=cfg.train.resize_check_s),
        # Ray Train's own bookkeeping (no checkpoint goes through it): beside a local run, in
        # the driver node's scratch directory for a run_dir on S3
        run_config=RayRunConfig(name=cfg.name, storage_path=str(scratch_dir(cfg.run_dir).resolve() / "ray"),
                                failure_config=FailureConfig(max_failures=max_failures)),
    )
    trainer.fit()


# Exit statuses of a driver that was signalled (docs/checkpoints.md, "Stopping and restarts"):
# 128 + the signal's number once the workers saved and ended, as a shell reports a process
# its signal ended; FORCED_EXIT when they were abandoned before a save was confirmed.
FORCED_EXIT = 1


def run_supervised(cfg: RunConfig, *, name: str, resume: str | None = None, max_failures: int = 0) -> int:
    """run_training for a driver (`vlm train`, `vlm cluster run`): the first SIGTERM or
    SIGINT asks the workers, through the GCS stop key, to save at the step they are in and
    end, within cfg.train.stop_grace_s; a second signal, or the grace period running out,
    ends this process at once (with it, its workers) with FORCED_EXIT. fit() runs on a
    thread so that Ray Train installs no SIGINT handler of its own (on the main thread it
    would abort the workers without a save). Returns the exit status: 0 when the run
    finished, 128 + signum when it stopped and saved."""
    stop_key = new_stop_key(name)
    box: dict = {}

    def fit() -> None:
        try:
            run_training(cfg, resume=resume, max_failures=max_failures, stop_key=stop_key)
        except BaseException as e:  # re-raised on the main thread
            box["error"] = e

    signals: list[int] = []

    def on_signal(signum, frame) -> None:  # a flag only: _wait acts on it
        signals.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    fitting = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    try:
        fitting.start()
        _wait(fitting, signals, stop_key, cfg.train.stop_grace_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    result = json.loads(_kv_get(f"{stop_key}/result") or "null")
    clear_stop(stop_key)
    if "error" in box:
        raise box["error"]
    if signals and result and result["stopped"]:
        print(f"stopped at step {result['step']}; checkpoint {result['checkpoint']}", flush=True)
        return 128 + signals[0]
    return 0


def _wait(fitting: threading.Thread, signals: list[int], stop_key: str, grace_s: float) -> None:
    """Until fit() returns: sends the stop request after the first signal; abandons the
    workers after a second one or when the grace period is over."""
    deadline = None
    while fitting.is_alive():
        fitting.join(0.2)
        if signals and deadline is None:
            print(f"{signal.Signals(signals[0]).name}: asking every worker to save a checkpoint and stop "
                  f"(grace period {grace_s:g}s; a second signal exits at once)", flush=True)
            request_stop(stop_key)
            deadline = time.monotonic() + grace_s
        if len(signals) > 1 and fitting.is_alive():
            _abandon(f"{signal.Signals(signals[1]).name} again: exiting now, without waiting for the workers")
        if deadline is not None and time.monotonic() > deadline and fitting.is_alive():
            _abandon(f"the workers did not save and end within train.stop_grace_s={grace_s:g}s: exiting")


def _abandon(message: str) -> None:
    """Exits at once. The workers are Ray actors owned, through Ray Train's controller, by
    this driver: Ray ends them when it exits (and a local Ray's processes share its fate)."""
    print(f"{message} (status {FORCED_EXIT}); the newest complete checkpoint is the one to resume", flush=True)
    sys.stderr.flush()
    os._exit(FORCED_EXIT)
