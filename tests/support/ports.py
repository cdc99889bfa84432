"""The tests' one free-port helper: a port on 127.0.0.1 that nothing listens on right now."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (and took back): free unless another
    process grabs it before the caller binds it, which the callers' retries or timeouts cover."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
