"""The CLI and the config tree import without torch (~2 s saved on every `vlm ...` start):
objective configs live in vlm.objectives.configs, and the `vlm` commands import torch, ray,
DeepSpeed and pyarrow inside their cmd_* functions, never while the parser is built."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECK = ("import sys, vlm.config, cluster.cli.main; "
         "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")


def test_config_and_cli_import_without_torch():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        "importing vlm.config / cluster.cli.main pulled in torch; run "
        "`python -X importtime -c 'import vlm.config, cluster.cli.main' 2>&1 | grep -B5 torch` to find the path.\n"
        + proc.stderr[-3000:])


HEAVY = ("torch", "ray", "deepspeed", "pyarrow")
HELP_CHECK = f"""
import argparse, contextlib, io, sys
from cluster.cli.main import build_parser, main

def commands(parser, path):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, path + [name])

every = list(commands(build_parser(), []))
assert len(every) > 20, every
for argv in every:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv + ["--help"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
assert not heavy, heavy[:10]
"""


def test_every_help_imports_no_heavy_package():
    """`vlm --help` and every `vlm COMMAND ... --help` build the parser and print without
    importing torch, ray, deepspeed or pyarrow: those imports live in the cmd_* functions."""
    proc = subprocess.run([sys.executable, "-c", HELP_CHECK], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (
        f"building the `vlm` parser or printing a --help imported one of {', '.join(HEAVY)}; run "
        "`python -X importtime -m cluster.cli.main --help 2>&1 | grep -B5 -E 'torch|ray|deepspeed|pyarrow'`\n"
        + proc.stderr[-3000:])


def test_objective_registry_resolves_names():
    from vlm.objectives.configs import ITGConfig
    from vlm.objectives.itg import ITG, caption_loss
    from vlm.objectives.registry import OBJECTIVES, build_objective

    assert OBJECTIVES["itg"] is ITG
    assert callable(build_objective) and callable(caption_loss)
    assert ITGConfig(weight=2).weight == 2
    assert ITGConfig.model_validate(ITGConfig(weight=2).model_dump()) == ITGConfig(weight=2)
    from vlm.objectives.itg import ITGConfig as FromModule
    assert FromModule is ITGConfig


def test_loss_functions_not_shadowed_by_their_submodules():
    # clip_infonce, siglip, slip_image, unicl name both a submodule and its loss function
    import vlm.objectives
    import vlm.objectives.siglip  # noqa: F401  (loads clip_infonce too)
    import vlm.objectives.slip_image  # noqa: F401
    import vlm.objectives.unicl  # noqa: F401
    from vlm.objectives.clip_infonce import clip_infonce
    from vlm.objectives.siglip import siglip
    from vlm.objectives.slip_image import slip_image
    from vlm.objectives.unicl import unicl

    for fn in (clip_infonce, siglip, slip_image, unicl):
        assert callable(fn) and not isinstance(fn, type(vlm.objectives)), fn
