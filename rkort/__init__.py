"""rkort: onnxruntime's Python API, running ONNX models on Rockchip NPUs.

``import rkort as onnxruntime`` and use it as onnxruntime: every public name of onnxruntime is here
(they are onnxruntime's own objects), ``InferenceSession`` additionally accepts the
``RKNNExecutionProvider`` (alias ``"RKNN"``), and the provider lists include it.
"""

from __future__ import annotations

import importlib.util as _importlib_util

import onnxruntime as _ort

# Every public name of onnxruntime, as onnxruntime's own object; rkort's replacements follow.
globals().update({k: v for k, v in vars(_ort).items() if not k.startswith("_") and k != "capi"})

from . import capi  # noqa: E402,F401
from .integrations.install import install  # noqa: E402,F401
from .options import PROVIDER as _PROVIDER  # noqa: E402
from .session import InferenceSession, IOBinding  # noqa: E402,F401

__version__ = "0.1.0"
#: The version of the onnxruntime rkort runs its CPU work on.
onnxruntime_version: str = _ort.__version__


def get_all_providers() -> list[str]:
    """onnxruntime's provider names with ``RKNNExecutionProvider`` added (CPU stays last)."""
    names = [n for n in _ort.get_all_providers() if n != "CPUExecutionProvider"]
    return [*names, _PROVIDER, "CPUExecutionProvider"]


def get_available_providers() -> list[str]:
    """Providers usable here: RKNN first when a board runtime or the converter is installed."""
    names = list(_ort.get_available_providers())
    if (
        _importlib_util.find_spec("rknnlite") is not None
        or _importlib_util.find_spec("rknn") is not None
    ):
        names.insert(0, _PROVIDER)
    return names
