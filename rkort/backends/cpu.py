"""The reference backend: onnxruntime's CPU provider on the ONNX file itself."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..options import RKNNOptions
from ..spec import BuildSpec
from .base import Opening, Runner


class CpuRunner(Runner):
    name = "cpu"

    def __init__(self, session: Any, spec: BuildSpec) -> None:
        super().__init__(spec)
        self._session = session

    def _run(self, inputs: list[np.ndarray]) -> list[Any]:
        feed = dict(zip(self.spec.input_names, inputs))
        return list(self._session.run(list(self.spec.output_names), feed))

    def _release(self) -> None:
        self._session = None


def open_cpu(spec: BuildSpec) -> Runner:
    """An onnxruntime CPU session on ``spec.model_path``, behind the Runner interface."""
    # onnxruntime's own class, even when rkort.install() has put rkort's in its place.
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    session = InferenceSession(spec.model_path, providers=["CPUExecutionProvider"])
    return CpuRunner(session, spec)


class _Cpu:
    """onnxruntime on the spec's own ONNX file: the reference every NPU backend is checked against."""

    name = "cpu"
    builds = True

    def available(self, options: RKNNOptions | None = None) -> bool:
        return True

    def open(self, o: Opening) -> Runner:
        return open_cpu(o.spec)


BACKEND = _Cpu()
