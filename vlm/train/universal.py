"""Resuming at another world size: a ZeRO checkpoint converted to DeepSpeed's universal format."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from vlm.checkpoint.safeload import check_files, weights_only_loads


def to_universal(ckpt: Path, out: Path) -> None:
    """Converts the ZeRO checkpoint `ckpt` into `out` in DeepSpeed's universal format (which
    DeepSpeed loads at any world size), through `out`.partial: `out` is whole or absent."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    check_files(ckpt)  # on every node that converts: it reads every file
    with weights_only_loads():  # one extract worker: in this process
        ds_to_universal(Namespace(input_folder=str(ckpt), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=False))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
