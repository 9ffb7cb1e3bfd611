"""A Rockchip board driven over adb by rknn-toolkit2 (``rknn_server`` must run on the board).

The toolkit is used from a worker process, as for the simulator, so its console output and any
crash stay out of the user's process. Note: the toolkit starts an adb server that outlives Python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .. import _worker
from ..compiler import BuildSpec, CompileError, ToolkitNotInstalled
from .base import Runner, RunnerError
from .simulator import WorkerRunner


def open_adb(blob_path: Path, spec: BuildSpec, target: str, device_id: str | None) -> Runner:
    """Load ``blob_path`` onto the board ``device_id`` (the only one when None) and serve it."""
    worker = _worker.WorkerProcess(
        "serve",
        _worker.build_request(
            spec,
            export=False,
            runtime={"blob": os.path.abspath(blob_path), "target": target, "device_id": device_id},
        ),
        subject=f"{spec.model_name} on the {target} board {device_id or '(default)'} over adb",
        progress=False,
    )
    try:
        worker.wait_until("ready")
    except ToolkitNotInstalled:
        worker.close()
        raise
    except CompileError as e:
        worker.close()
        raise RunnerError(str(e)) from e
    except BaseException:
        worker.close()
        raise
    return WorkerRunner(worker, spec, "adb")


def list_devices(timeout: float = 10.0) -> list[str]:
    """Serial numbers of the adb devices ready for use; [] when adb is not on PATH.

    ``adb devices`` starts the adb server when none runs; it is only called when adb is installed.
    """
    adb = shutil.which("adb")
    if adb is None:
        return []
    try:
        out = subprocess.run(
            [adb, "devices"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    serials = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1] == "device":
            serials.append(parts[0])
    return serials
