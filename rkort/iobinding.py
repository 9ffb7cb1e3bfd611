"""onnxruntime's IOBinding for rkort sessions: CPU inputs remembered so a run on RKNN can read
them, and every binding remembered so it can be made again for the whole model once a session
that opened on its model's face loads it."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as _ort
from onnxruntime.capi import _pybind_state as C
from onnxruntime.capi.onnxruntime_inference_collection import IOBinding as _OrtIOBinding


class IOBinding(_OrtIOBinding):
    """onnxruntime's IOBinding, remembering CPU inputs so a run on RKNN can use them."""

    def __init__(self, session: _ort.InferenceSession) -> None:
        super().__init__(session)
        self._inputs: dict[str, np.ndarray] = {}
        self._outputs: dict[str, _ort.OrtValue | None] = {}
        self._opaque = False
        self._results: list[_ort.OrtValue] | None = None
        #: The C session the binding is made for, and every bind call, to bind again to another.
        self._bound_to = session._sess
        self._calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self._calls.append((name, args, kwargs))

    def rebind(self, session: _ort.InferenceSession) -> None:
        """Make the same bindings for ``session``'s C session (the whole model, loaded after the
        binding was made for the session's face)."""
        if self._bound_to is session._sess:
            return
        self._iobinding = C.SessionIOBinding(session._sess)
        self._bound_to = session._sess
        for name, args, kwargs in self._calls:
            getattr(_OrtIOBinding, name)(self, *args, **kwargs)

    def bind_cpu_input(self, name, arr_on_cpu):  # type: ignore[no-untyped-def]
        super().bind_cpu_input(name, arr_on_cpu)
        self._record("bind_cpu_input", name, arr_on_cpu)
        self._inputs[name] = arr_on_cpu

    def bind_ortvalue_input(self, name, ortvalue):  # type: ignore[no-untyped-def]
        super().bind_ortvalue_input(name, ortvalue)
        self._record("bind_ortvalue_input", name, ortvalue)
        if ortvalue.device_name().lower() == "cpu" and ortvalue.is_tensor():
            self._inputs[name] = ortvalue.numpy()
        else:
            self._opaque = True

    def bind_input(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().bind_input(*args, **kwargs)
        self._record("bind_input", *args, **kwargs)
        self._opaque = True

    def bind_output(
        self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None
    ):  # type: ignore[no-untyped-def]
        super().bind_output(name, device_type, device_id, element_type, shape, buffer_ptr)
        self._record("bind_output", name, device_type, device_id, element_type, shape, buffer_ptr)
        if buffer_ptr is not None or str(device_type).lower() != "cpu":
            self._opaque = True
        self._outputs[name] = None

    def bind_ortvalue_output(self, name, ortvalue):  # type: ignore[no-untyped-def]
        super().bind_ortvalue_output(name, ortvalue)
        self._record("bind_ortvalue_output", name, ortvalue)
        self._outputs[name] = ortvalue

    def clear_binding_inputs(self):  # type: ignore[no-untyped-def]
        super().clear_binding_inputs()
        self._calls = [c for c in self._calls if "input" not in c[0]]
        self._inputs.clear()
        self._opaque = False

    def clear_binding_outputs(self):  # type: ignore[no-untyped-def]
        super().clear_binding_outputs()
        self._calls = [c for c in self._calls if "output" not in c[0]]
        self._outputs.clear()
        self._results = None

    def _set_results(self, names: list[str], outs: list[np.ndarray]) -> None:
        results = []
        for name, out in zip(names, outs):
            bound = self._outputs.get(name)
            if bound is not None:
                bound.update_inplace(out)
                results.append(bound)
            else:
                results.append(_ort.OrtValue.ortvalue_from_numpy(out))
        self._results = results

    def get_outputs(self):  # type: ignore[no-untyped-def]
        if self._results is not None:
            return list(self._results)
        return super().get_outputs()

    def copy_outputs_to_cpu(self):  # type: ignore[no-untyped-def]
        if self._results is not None:
            return [r.numpy() for r in self._results]
        return super().copy_outputs_to_cpu()
