"""A Rockchip board driven over adb by rknn-toolkit2 (``rknn_server`` must run on the board).

The toolkit is used from a worker process, as for the simulator, so its console output and any
crash stay out of the user's process. Note: the toolkit starts an adb server that outlives Python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..options import RKNNOptions
from ..platform import toolkit_version
from ..spec import BuildSpec, CompileError, ToolkitNotInstalled
from ..toolkit.process import WorkerProcess
from ..toolkit.protocol import build_request
from .base import Opening, Runner, RunnerError
from .simulator import WorkerRunner


def open_adb(blob_path: Path, spec: BuildSpec, target: str, device_id: str | None) -> Runner:
    """Load ``blob_path`` onto the board ``device_id`` (the only one when None) and serve it."""
    worker = WorkerProcess(
        "serve",
        build_request(
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


class _Adb:
    name = "adb"
    builds = False

    def available(self, options: RKNNOptions | None = None) -> bool:
        if options is not None:
            return bool(options.device_id)
        return toolkit_version() is not None and bool(list_devices())

    def open(self, o: Opening) -> Runner:
        if o.blob is None:
            raise ValueError("the adb backend runs compiled blobs: give Opening.blob")
        device = o.options.device_id if o.options is not None else None
        return open_adb(o.blob, o.spec, o.spec.target, device)


BACKEND = _Adb()
