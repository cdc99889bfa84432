"""The CLI and the config tree import without torch (~2 s saved on every `vlm ...` start):
objective configs live in vlm.objectives.configs, and vlm.models / vlm.objectives resolve
their torch names lazily."""
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


def test_lazy_objective_names_still_resolve():
    from vlm.objectives import ITG, OBJECTIVES, ITGConfig, build_objective, caption_loss

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
    from vlm.objectives import clip_infonce, siglip, slip_image, unicl

    for fn in (clip_infonce, siglip, slip_image, unicl):
        assert callable(fn) and not isinstance(fn, type(vlm.objectives)), fn
