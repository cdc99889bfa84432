"""Runs vlm.engine.train on N Ray Train workers (one per GPU, or per CPU slot).

Failure policy: with max_failures > 0, when a worker process or its node dies Ray Train
tears the group down and starts a new one, whose workers resume from the newest complete
checkpoint (resume="auto"), so a run loses at most the steps since its last save.

Stop channel: the driver cannot signal the workers (they are Ray actors on other
processes, maybe other nodes), so `request_stop` writes a key into Ray's GCS key-value
store, which every worker polls once per step; the workers then save together and end
("stopped"). The job entrypoint calls it from its SIGTERM handler (`vlm cluster stop`)."""
from __future__ import annotations

import os
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
from vlm.rendezvous import bound_store, pin_gloo_to

STOP_NAMESPACE = "vlm"
# rank 0's store server, from _serve_store until its process group takes it over
_STORE: dict[str, dist.TCPStore] = {}


class NodeBoundTorchConfig(TorchConfig):
    """Ray Train's TorchConfig, but the process group's store listens on rank 0's node
    address only (127.0.0.1 for a local Ray), where Ray's own would take connections on
    every interface (see vlm/rendezvous.py), and gloo listens on the node's address."""

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
    from vlm.engine import train

    stop_key = loop_config.get("stop_key")
    should_stop = (lambda: stop_requested(stop_key)) if stop_key else None
    train(config_from_dict(loop_config["config"]), resume=loop_config["resume"], should_stop=should_stop)


def new_stop_key(name: str) -> str:
    """A key unique to this launch: a stop request of an earlier job of the same run name
    never stops a later one."""
    return f"stop/{name}/{uuid.uuid4().hex}"


def request_stop(stop_key: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(stop_key, b"1", namespace=STOP_NAMESPACE)


def stop_requested(stop_key: str) -> bool:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_exists(stop_key, namespace=STOP_NAMESPACE)


def clear_stop(stop_key: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(stop_key, namespace=STOP_NAMESPACE)


def run_training(cfg: RunConfig, *, resume: str | None = None, max_failures: int = 0,
                 stop_key: str | None = None) -> None:
    """Blocks until every worker has finished; raises if the run failed (after
    max_failures restarts of the worker group; -1: unlimited). resume: None, 'auto',
    'latest' or a tag. Every start of the group runs the same loop config, so with
    restarts allowed None and 'latest' become 'auto' (a restart then resumes the newest
    checkpoint); a tag would be resumed again after a restart, losing the steps since."""
    from cluster.ray_local import worker_env

    # Whether the workers get GPUs is the cluster's business, not the driver's: a job's
    # driver runs on the head, which usually has none.
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if ray.is_initialized() else torch.cuda.is_available()
    if max_failures != 0 and resume in (None, "latest"):
        # the first start and every restart run the same loop config: 'auto' starts fresh
        # when there is no checkpoint and resumes the newest one after a restart
        resume = "auto"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "resume": resume,
                           "cwd": os.getcwd(), "env": worker_env(), "stop_key": stop_key},
        torch_config=NodeBoundTorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=RayRunConfig(name=cfg.name, storage_path=str(Path(cfg.run_dir).resolve() / "ray"),
                                failure_config=FailureConfig(max_failures=max_failures)),
    )
    trainer.fit()
