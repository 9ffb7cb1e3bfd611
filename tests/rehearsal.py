"""Rehearsing a board in the test process: the SoC declared, a librknnrt of a given version, and
the rehearsal's ``rknnlite`` stand-in importable (what ``rkort run --board`` sets up for a whole
process tree, see rkort.integrations.run.rehearsal_environment)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from rkort.platform import BOARD_ENV, LIBRKNNRT_ENV
from rkort.rehearsal import SITE_DIR


def fake_librknnrt(directory: Path, version: str) -> Path:
    """A file whose strings say what librknnrt.so's say: its version."""
    lib = directory / f"librknnrt-{version}.so"
    lib.write_bytes(b"\x7fELF" + b"\0" * 64 + f"librknnrt version: {version} (test)\0".encode())
    return lib


@contextlib.contextmanager
def rehearse_in_process(soc: str, directory: Path, librknnrt: str = "2.5.0") -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in (BOARD_ENV, LIBRKNNRT_ENV)}
    os.environ[BOARD_ENV] = soc
    os.environ[LIBRKNNRT_ENV] = str(fake_librknnrt(directory, librknnrt))
    sys.path.insert(0, str(SITE_DIR))
    try:
        yield
    finally:
        sys.path.remove(str(SITE_DIR))
        for name in [m for m in sys.modules if m == "rknnlite" or m.startswith("rknnlite.")]:
            del sys.modules[name]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
