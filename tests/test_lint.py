"""The code stays ruff- and mypy-clean; run with the tests so CI checks it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "shortgpt_serve", "tests", "benchmarks", "loadtests", "scripts"],
        ["ruff", "format", "--check", "shortgpt_serve", "tests", "benchmarks", "loadtests", "scripts"],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_lint(cmd: list[str]) -> None:
    tool = BIN / cmd[0]
    if not tool.exists():
        pytest.fail(f"{cmd[0]} is not installed in {BIN}; run scripts/setup.sh --dev")
    result = subprocess.run([str(tool), *cmd[1:]], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
