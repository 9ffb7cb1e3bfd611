"""The one interface every backend fills in: a Runner runs one compiled model on some device."""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

import numpy as np

from ..options import RKNNOptions
from ..spec import BuildSpec

_R = TypeVar("_R", bound="Runner")


@dataclass(frozen=True)
class Opening:
    """What a backend opens a Runner from: the spec, and the compiled ``blob`` (backends that
    load blobs) or the place to ``export_to`` the blob it builds (backends that build), the
    session's ``options`` (core mask, device id, ...) and whether to show ``progress``."""

    spec: BuildSpec
    blob: Optional[Path] = None
    options: Optional[RKNNOptions] = None
    export_to: Optional[Path] = None
    progress: Optional[bool] = None
    #: The NPU cores this context runs on (a board's core mask); None: the options' core mask.
    core_mask: Optional[int] = None


class RunnerError(RuntimeError):
    """A backend could not run the model (the device, the runtime or its worker failed)."""


class RunnerClosed(RunnerError):
    """The runner was closed; open a new one."""


class RunnerDied(RunnerError):
    """The runner's device context or worker process is gone; it cannot run anything again.

    A plain :class:`RunnerError` means this call failed and the runner still works (the runtime
    refused these inputs, say); this one means every later call would fail too.
    """


class Runner(abc.ABC):
    """Runs one model with static shapes.

    ``run()`` takes the inputs in ``spec.input_names`` order (already of the declared dtypes and
    shapes) and returns the outputs in ``spec.output_names`` order, reshaped to
    ``spec.output_shapes`` (float32 from the NPU backends; the caller casts). Calls from several
    threads are serialized: one RKNN context is never used by two threads at once.
    """

    #: The backend's name: "board", "simulator", "adb" or "cpu".
    name: str = "runner"
    #: Bytes of the compiled model this runner holds loaded (its blob's size, where known).
    memory: int = 0

    def __init__(self, spec: BuildSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._closed = False

    @abc.abstractmethod
    def _run(self, inputs: list[np.ndarray]) -> Sequence[Any]:
        """One inference; called with the lock held, never after _release()."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free the device context; called once, with the lock held."""

    def run(
        self,
        inputs: Sequence[np.ndarray],
        output_shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> list[np.ndarray]:
        """Run the model; outputs reshaped to ``output_shapes``, by default the spec's (a
        multi-shape blob gives the shapes of the input set being run)."""
        if len(inputs) != len(self.spec.input_names):
            raise ValueError(
                f"{self.name} runner expects {len(self.spec.input_names)} inputs "
                f"{list(self.spec.input_names)}, got {len(inputs)}"
            )
        with self._lock:
            if self._closed:
                raise RunnerClosed(f"this {self.name} runner for {self.spec.model_name} is closed")
            outputs = self._run(list(inputs))
        if len(outputs) != len(self.spec.output_names):
            raise RunnerError(
                f"{self.name} returned {len(outputs)} outputs for {self.spec.model_name}, "
                f"expected {len(self.spec.output_names)} {list(self.spec.output_names)}"
            )
        return [
            _reshaped(np.asarray(o), shape, name, self.name)
            for o, shape, name in zip(
                outputs, output_shapes or self.spec.output_shapes, self.spec.output_names
            )
        ]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the device context; later calls do nothing, later run()s raise RunnerClosed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown, half-built object
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<{type(self).__name__} {self.name} {self.spec.model_name} {self.spec.target} {state}>"
        )


def _reshaped(out: np.ndarray, shape: tuple[int, ...], name: str, backend: str) -> np.ndarray:
    if out.shape == shape:
        return out
    if out.size != int(np.prod(shape, dtype=np.int64)):
        raise RunnerError(
            f"{backend} returned output {name!r} of shape {list(out.shape)}, which cannot be "
            f"the declared shape {list(shape)}"
        )
    return out.reshape(shape)
