"""OpenCLIP's own modules, loaded from their files in the installed open_clip_torch.

The package's ``__init__`` imports torchvision (which must not enter this environment:
it would bring another torch), so ``import open_clip`` is never done; single modules
that need only torch, numpy, ftfy and regex (``loss.py``, ``tokenizer.py``) are loaded by
path instead. Tests skip when open_clip_torch is not installed (``make`` installs it with
``--no-deps``)."""
from __future__ import annotations

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
