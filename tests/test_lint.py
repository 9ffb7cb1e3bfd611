"""The code stays clean: ruff (lint and format) and mypy, as configured in pyproject.toml."""

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


def test_mypy() -> None:
    p = _run("mypy")
    assert p.returncode == 0, p.stdout + p.stderr
