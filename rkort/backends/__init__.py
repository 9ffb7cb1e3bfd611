"""Runners for compiled models, one small module per device, all behind :class:`Runner`.

``board`` (rknn-toolkit-lite2 on a Rockchip board), ``simulator`` (rknn-toolkit2 on a host),
``adb`` (rknn-toolkit2 driving a board over adb) and ``cpu`` (onnxruntime, the reference).
"""

from __future__ import annotations

import importlib.util
import shutil

from .base import Runner, RunnerClosed, RunnerDied, RunnerError

__all__ = ["Runner", "RunnerClosed", "RunnerDied", "RunnerError", "available_backends"]


def available_backends() -> list[str]:
    """The backends that can run on this machine now, in order of preference."""
    from ..platform import is_board

    names = []
    has_toolkit = importlib.util.find_spec("rknn") is not None
    if is_board() and importlib.util.find_spec("rknnlite") is not None:
        names.append("board")
    if has_toolkit:
        names.append("simulator")
    if has_toolkit and shutil.which("adb") is not None:
        from .adb import list_devices

        if list_devices():
            names.append("adb")
    if importlib.util.find_spec("onnxruntime") is not None:
        names.append("cpu")
    return names
