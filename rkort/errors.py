"""onnxruntime's exception classes, helpers that raise them with onnxruntime's message form, and
:class:`Unsupported`, rkort's own word for "RKNN cannot run this model".

rkort raises the very classes onnxruntime defines (not look-alikes), so ``except
onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument`` catches rkort's errors too.
"""

from __future__ import annotations

from onnxruntime.capi import onnxruntime_pybind11_state as _state
from onnxruntime.capi.onnxruntime_pybind11_state import (  # noqa: F401  (re-exported)
    EngineError,
    EPFail,
    Fail,
    InvalidArgument,
    InvalidGraph,
    InvalidProtobuf,
    NoModel,
    NoSuchFile,
    NotImplemented,
    RuntimeException,
)

# onnxruntime's StatusCode numbers and names, as they appear in its messages.
_CODES: dict[type[Exception], tuple[int, str]] = {
    Fail: (1, "FAIL"),
    InvalidArgument: (2, "INVALID_ARGUMENT"),
    NoSuchFile: (3, "NO_SUCHFILE"),
    NoModel: (4, "NO_MODEL"),
    EngineError: (5, "ENGINE_ERROR"),
    RuntimeException: (6, "RUNTIME_EXCEPTION"),
    InvalidProtobuf: (7, "INVALID_PROTOBUF"),
    NotImplemented: (9, "NOT_IMPLEMENTED"),
    InvalidGraph: (10, "INVALID_GRAPH"),
    EPFail: (11, "EP_FAIL"),
}
# Newer onnxruntime releases add classes (NotFound, ModelLoaded, ...); onnxruntime 1.19 (the last
# with Python 3.9 wheels) lacks them, so they are looked up rather than imported.
if hasattr(_state, "NotFound"):
    _CODES[_state.NotFound] = (12, "NOT_FOUND")


def ort_error(cls: type[Exception], text: str) -> Exception:
    """An instance of onnxruntime's exception ``cls`` whose message reads as onnxruntime's would."""
    code, name = _CODES[cls]
    return cls(f"[ONNXRuntimeError] : {code} : {name} : {text}")


class Unsupported(Exception):
    """RKNN cannot run this model here (the session falls back to the next provider, or raises
    onnxruntime's EPFail when fallback is off)."""
