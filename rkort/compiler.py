"""Compile one ONNX graph with static shapes into an RKNN blob, in a child process.

rknn-toolkit2 prints to the process's stdout (also from C), writes files into the current directory
and can abort the whole process, so every conversion runs in a toolkit child process
(:mod:`rkort.toolkit`) with a temporary working directory of its own. The child's console output
goes to the ``rkort.toolkit`` logger at DEBUG; its failures come back as
:class:`~rkort.spec.CompileError` subclasses.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .files import place_file
from .platform import toolkit_version
from .spec import (  # noqa: F401  (the compile errors are part of this room's interface)
    BuildFailed,
    BuildSpec,
    CompileError,
    CompileTimeout,
    ConverterCrashed,
    ToolkitNotInstalled,
)
from .toolkit.process import WorkerProcess
from .toolkit.protocol import build_request

__all__ = [
    "BuildFailed",
    "BuildSpec",
    "CompileError",
    "CompileTimeout",
    "ConverterCrashed",
    "ToolkitNotInstalled",
    "compile_blob",
    "toolkit_version",
]


def compile_blob(
    spec: BuildSpec,
    dest: Path,
    *,
    progress: bool | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Build ``spec`` into an RKNN blob at ``dest`` in a child process.

    ``dest`` is written (atomically) only after a successful export. ``progress=None`` shows a
    progress line on stderr when stderr is a terminal. Returns ``{"build_seconds",
    "toolkit_version", "seconds", "blob_bytes"}``; raises a :class:`CompileError` subclass.
    """
    started = time.monotonic()
    worker = WorkerProcess(
        "compile",
        build_request(spec, export=True),
        subject=f"{spec.model_name} for {spec.target}",
        progress=progress,
    )
    try:
        info = worker.wait_until("done", timeout=timeout)
        place_file(worker.workdir / info["blob"], Path(dest))
    finally:
        worker.close()
    return {
        "build_seconds": info["build_seconds"],
        "toolkit_version": info["toolkit_version"],
        "seconds": time.monotonic() - started,
        "blob_bytes": Path(dest).stat().st_size,
    }
