"""OpenCLIP's own modules, loaded from their files in the installed open_clip_torch.

The package's ``__init__`` imports torchvision (which must not enter this environment:
it would bring another torch), so ``import open_clip`` is never done; single modules
that need only torch, numpy, ftfy and regex (``loss.py``, ``tokenizer.py``) are loaded by
path instead. Tests skip when open_clip_torch is not installed (``make`` installs it with
``--no-deps``)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def package_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (make installs it with --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def load(module: str) -> ModuleType:
    """open_clip's ``module`` (e.g. "loss", "tokenizer") as a standalone module."""
    name = f"_openclip_{module}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, package_dir() / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class _FrozenBatchNorm2dStandIn:
    """Stands in for torchvision.ops.misc.FrozenBatchNorm2d, which open_clip's utils.py imports
    at the top but only freeze_batch_norm_2d uses (locking a ResNet tower), which no test
    calls; it fails loudly if anything does."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("FrozenBatchNorm2d (torchvision) is not available in this environment")


def model_module() -> ModuleType:
    """open_clip's ``model.py`` (its CLIP class, with the ViT and modified-ResNet towers),
    imported as a submodule of a private package name so its relative imports resolve
    without running the package's ``__init__``. While its ``utils.py`` is imported (and only
    then), sys.modules holds a ``torchvision.ops.misc`` with a stand-in FrozenBatchNorm2d;
    it is removed before anything else is imported (transformers, which model.py imports,
    looks for torchvision), so nothing else sees a torchvision."""
    pkg_name = "_openclip_pkg"
    if f"{pkg_name}.model" in sys.modules:
        return sys.modules[f"{pkg_name}.model"]
    pkg = ModuleType(pkg_name)
    pkg.__path__ = [str(package_dir())]
    sys.modules[pkg_name] = pkg
    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    saved = {n: sys.modules.get(n) for n in names}
    misc = ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = _FrozenBatchNorm2dStandIn
    sys.modules.update({"torchvision": ModuleType("torchvision"), "torchvision.ops": ModuleType("torchvision.ops"),
                        "torchvision.ops.misc": misc})
    try:
        importlib.import_module(f"{pkg_name}.utils")
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod
    return importlib.import_module(f"{pkg_name}.model")
