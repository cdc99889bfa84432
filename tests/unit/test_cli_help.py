import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli.main import main
from support.ports import free_port

SUBCOMMANDS = [["demo"], ["data"], ["data", "ingest"], ["data", "score"], ["data", "filter"], ["data", "inspect"],
               ["caption"], ["eval-generative"],
               ["train"], ["eval"], ["model"], ["model", "list"], ["model", "info"], ["monitor"], ["report"],
               ["ckpt"], ["ckpt", "list"], ["ckpt", "inspect"], ["ckpt", "export"], ["ckpt", "convert"],
               ["cluster"], ["cluster", "submit"], ["cluster", "status"], ["cluster", "logs"], ["cluster", "stop"],
               ["cluster", "list"], ["cluster", "run"]]


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


def test_cluster_submit_without_server_names_the_address(capsys):
    """No job server at the address: one clear line, no traceback."""
    port = free_port()  # a loopback port nobody listens on
    code = main(["cluster", "list", "--address", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 1 and f"http://127.0.0.1:{port}" in err and "Traceback" not in err


def test_cluster_submit_rejects_bad_run_name(capsys):
    code = main(["cluster", "submit", "--config", "configs/demo.yaml", "--name", "bad name/../x",
                 "--address", "http://127.0.0.1:9"])
    assert code == 1 and "run name 'bad name/../x'" in capsys.readouterr().err
