"""The code stays clean: ruff (lint and format) and mypy, as configured in pyproject.toml.

mypy checks rkort as Python 3.9 (the oldest declared version) against the packages a Python 3.9
board installs (the board venv scripts/setup.sh makes), so nothing newer slips in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_lint() -> None:
    p = _run("ruff", "check", "rkort", "tests", "compat", "benchmarks")
    assert p.returncode == 0, p.stdout + p.stderr


PY39 = ROOT / ".venv-board" / "py3.9" / "bin" / "python"


def test_ruff_format() -> None:
    p = _run("ruff", "format", "--check", "rkort", "tests", "compat", "benchmarks")
    assert p.returncode == 0, p.stdout + p.stderr


def test_mypy_as_python_3_9() -> None:
    if not PY39.exists():
        import pytest

        pytest.skip("no Python 3.9 board venv here (scripts/setup.sh makes one where 3.9 exists)")
    p = _run("mypy", "--python-executable", str(PY39))
    assert p.returncode == 0, p.stdout + p.stderr


def test_mypy_with_the_development_packages() -> None:
    p = _run("mypy", "--python-version", "3.11")
    assert p.returncode == 0, p.stdout + p.stderr
