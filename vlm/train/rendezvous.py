"""Joining torch.distributed without listening on every interface.

c10d's TCPStore server binds the wildcard address (`*:PORT`) whatever host it is given,
and anyone who reaches the port may read and write the keys the ranks exchange: it has no
authentication. Given a socket that is already listening (master_listen_fd), it serves on
that one instead, so rank 0 binds the socket itself: to 127.0.0.1 on one machine, to its
node's own address on a cluster. Gloo listens on the address of the interface named by
GLOO_SOCKET_IFNAME, else on whatever the hostname resolves to, so that is pinned too."""
from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


def bound_store(host: str, port: int, *, rank: int, world_size: int, timeout: timedelta) -> dist.TCPStore:
    """Rank 0 serves the store on host:port and nowhere else (port 0: any free one, then
    read `.port`); every other rank connects to it there."""
    if rank != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()
    except OSError as e:
        sock.close()
        raise ConnectionError(f"cannot listen on {host}:{port} for torch.distributed's store: "
                              f"{e.strerror or e}") from None
    # detach(): the store owns the descriptor from here on, and closes it
    return dist.TCPStore(host, sock.getsockname()[1], world_size, is_master=True, timeout=timeout,
                         wait_for_workers=False, master_listen_fd=sock.detach())


def interface_of(address: str) -> str | None:
    """The name of this machine's network interface that holds `address`, if one does."""
    import psutil

    try:
        wanted = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    if ipaddress.ip_address(a.address.split("%")[0]) == wanted:
                        return name
                except ValueError:
                    continue
    return None


def pin_gloo_to(address: str) -> None:
    """Makes gloo listen on the interface holding `address` (this node's own), unless the
    user has chosen one with GLOO_SOCKET_IFNAME."""
    if not os.environ.get("GLOO_SOCKET_IFNAME"):
        name = interface_of(address)
        if name:
            os.environ["GLOO_SOCKET_IFNAME"] = name


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def init_from_env(backend: str) -> None:
    """init_process_group from RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, rank 0
    serving the store on MASTER_ADDR only. Under torchrun's agent store the agent serves
    it, and the ranks only connect, as torch does by itself."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend)
        return
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if host == "localhost" or _is_loopback(host):  # one machine: gloo on loopback too
        pin_gloo_to("127.0.0.1" if host == "localhost" else host)
    store = bound_store(host, port, rank=rank, world_size=world_size, timeout=default_pg_timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def ensure_process_group() -> tuple[int, int]:
    """(rank, world size) of the process group a launcher created, or of a 1-process one
    started here when there is none."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        # not dist.init_process_group's env://: its store would listen on every interface
        init_from_env("nccl" if torch.cuda.is_available() else "gloo")
    os.environ.setdefault("LOCAL_RANK", "0")
    return dist.get_rank(), dist.get_world_size()
