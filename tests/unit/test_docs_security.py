"""docs/security.md names, for each defence, the test that proves it: every test file it
names exists, and every command it says is refused or bounded is a real `vlm` command."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "security.md").read_text()


def test_every_test_file_the_page_names_exists():
    named = set(re.findall(r"tests/((?:unit/|multiproc/|e2e/)?test_\w+\.py|conftest\.py)", DOC))
    assert len(named) >= 8, named
    missing = sorted(n for n in named if not (ROOT / "tests" / n).is_file())
    assert not missing, missing


@pytest.mark.parametrize("command", sorted(set(re.findall(r"`vlm ((?:ckpt |data |cluster )?[a-z-]+)", DOC))))
def test_every_command_the_page_names_exists(command):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command.split(), "--help"])
    assert e.value.code == 0
