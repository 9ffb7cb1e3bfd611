"""rkort: onnxruntime's Python API, running ONNX models on Rockchip NPUs.

``import rkort as onnxruntime`` and use it as onnxruntime: every public name of onnxruntime is here
(they are onnxruntime's own objects), ``InferenceSession`` additionally accepts the
``RKNNExecutionProvider`` (alias ``"RKNN"``), and the provider lists include it.
"""

from __future__ import annotations

import onnxruntime as _ort

# Every public name of onnxruntime, as onnxruntime's own object; rkort's replacements follow.
globals().update({k: v for k, v in vars(_ort).items() if not k.startswith("_") and k != "capi"})

from . import capi  # noqa: E402,F401
from .integrations.install import install  # noqa: E402,F401
from .providers import get_all_providers, get_available_providers  # noqa: E402,F401
from .session import InferenceSession, IOBinding, session_stats  # noqa: E402,F401
from .version import __version__  # noqa: E402,F401

#: The version of the onnxruntime rkort runs its CPU work on.
onnxruntime_version: str = _ort.__version__
