import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main

SUBCOMMANDS = [["demo"], ["data"], ["data", "ingest"], ["data", "score"], ["data", "filter"], ["data", "inspect"],
               ["train"], ["eval"], ["model"], ["model", "list"], ["model", "info"], ["monitor"], ["report"],
               ["ckpt"], ["ckpt", "list"], ["ckpt", "inspect"], ["ckpt", "export"]]


def test_console_script_help():
    exe = Path(sys.executable).parent / "vlm"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("demo", "data", "train", "eval"):
        assert name in out.stdout


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=" ".join)
def test_subcommand_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert f"usage: vlm {' '.join(argv)}" in capsys.readouterr().out
