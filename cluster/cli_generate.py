"""Commands of the generative objectives (e.g. `vlm caption`)."""
from __future__ import annotations


def add_generate_commands(sub, config_args) -> None:
    """None yet."""
