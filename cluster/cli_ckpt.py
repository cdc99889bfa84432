"""`vlm ckpt list|inspect|export`."""
from __future__ import annotations


def add_ckpt_commands(sub, config_args) -> None:
    """None yet."""
