"""The names of ``onnxruntime.capi.onnxruntime_pybind11_state`` (exceptions first of all).

They are onnxruntime's own objects: an ``except`` clause written against either module catches both.
Every name onnxruntime's module has is found here, whichever release defines it.
"""

from __future__ import annotations

from typing import Any

from onnxruntime.capi import onnxruntime_pybind11_state as _C
from onnxruntime.capi.onnxruntime_pybind11_state import *  # noqa: F401,F403


def __getattr__(name: str) -> Any:
    return getattr(_C, name)
