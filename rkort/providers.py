"""The execution providers rkort offers: ``RKNNExecutionProvider`` beside onnxruntime's own.

The lists read onnxruntime's C functions directly (never ``onnxruntime.get_*_providers``, which
``rkort.install()`` replaces with these), so they never count RKNN twice.
"""

from __future__ import annotations

from onnxruntime.capi import _pybind_state as _C

from .options import PROVIDER
from .platform import board_runtime_importable, toolkit_version


def get_all_providers() -> list[str]:
    """onnxruntime's provider names with ``RKNNExecutionProvider`` added (CPU stays last)."""
    names = [n for n in _C.get_all_providers() if n != "CPUExecutionProvider"]
    return [*names, PROVIDER, "CPUExecutionProvider"]


def get_available_providers() -> list[str]:
    """Providers usable here: RKNN first when a board runtime or the converter is installed."""
    names = list(_C.get_available_providers())
    if board_runtime_importable() or toolkit_version() is not None:
        names.insert(0, PROVIDER)
    return names


def rknn_available() -> bool:
    """True when this machine can run the RKNN provider (a board runtime or the converter)."""
    return PROVIDER in get_available_providers()
