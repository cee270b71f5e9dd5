"""The code follows the project's lint and format rules (pyproject.toml, [tool.ruff])."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff():
    executable = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(executable).exists():
        pytest.fail("ruff is not installed: pip install '.[test]'")
    return executable


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run([_ruff(), *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
