"""The RKNN side of a session: compile a model's static signature through the cache and run it
on the backend this machine has (board NPU, adb board, or the host simulator)."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .cache import Cache, Entry, make_key
from .compiler import BuildSpec, compile_blob, toolkit_version
from .feed import dtype_of
from .model import ModelSource
from .options import RKNNOptions
from .platform import is_board, toolkit_lite_version

log = logging.getLogger("rkort")


class Unsupported(Exception):
    """RKNN cannot run this model (the session falls back to the next provider, or raises)."""


def choose_backend(options: RKNNOptions) -> str:
    """Which backend runs blobs here: 'adb' when a device is named, 'board' on a Rockchip board
    with rknn-toolkit-lite2, else 'simulator' on a host with rknn-toolkit2."""
    if options.device_id:
        return "adb"
    if is_board() and importlib.util.find_spec("rknnlite") is not None:
        return "board"
    if importlib.util.find_spec("rknn") is not None:
        return "simulator"
    raise Unsupported(
        "neither rknn-toolkit-lite2 (on a board) nor rknn-toolkit2 (the converter and its simulator) "
        "is installed; install rkort[board] on a board or rkort[compile] on a host"
    )


def runtime_version() -> str:
    """The RKNN toolchain version blobs are made for: the converter's, else the board runtime's."""
    return toolkit_version() or toolkit_lite_version() or "unknown"


class RKNNEngine:
    """Runs a whole model with static input shapes as one compiled blob."""

    def __init__(
        self,
        model: ModelSource,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        options: RKNNOptions,
    ) -> None:
        self.options = options
        self.backend = choose_backend(options)
        self.cache = Cache(options.cache_dir)
        self._model = model
        self.input_names = tuple(i.name for i in inputs)
        self.output_names = tuple(o.name for o in outputs)
        self.output_dtypes = tuple(_tensor_dtype(o) for o in outputs)
        for i in inputs:
            _tensor_dtype(i)
        input_shapes = tuple(_static_shape(i) for i in inputs)
        output_shapes = tuple(_static_shape(o) for o in outputs)
        self.spec = BuildSpec(
            model_path=str(model.path),
            input_names=self.input_names,
            input_shapes=input_shapes,
            input_dtypes=tuple(_tensor_dtype(i).name for i in inputs),
            output_names=self.output_names,
            output_shapes=output_shapes,
            output_dtypes=tuple(d.name for d in self.output_dtypes),
            target=options.target,
            quantized_dtype=options.quantized_dtype,
            dataset=options.dataset,
            optimization_level=options.optimization_level,
        )
        self._runner = self._open(self.spec)
        self._lock = threading.Lock()

    def key(self, spec: BuildSpec) -> str:
        """The cache key of one compiled blob."""
        return make_key(
            {
                "model": self._model.content_hash(self.cache),
                "toolkit": runtime_version(),
                **spec.key_parts(),
            }
        )

    def _open(self, spec: BuildSpec):  # type: ignore[no-untyped-def]
        key = self.key(spec)
        meta = {
            "model": str(self._model.path),
            "target": spec.target,
            "inputs": dict(zip(spec.input_names, [list(s) for s in spec.input_shapes])),
            "toolkit": runtime_version(),
        }
        progress = self.options.progress
        if self.backend == "simulator":
            from .backends.simulator import open_simulator

            # The simulator runs only what it built in-process, so one build both fills the
            # cache (for boards and `rkort warmup`) and serves this session.
            built_runner: list[Any] = []

            def build(dest: Path) -> dict[str, Any]:
                built_runner.append(open_simulator(spec, export_to=dest, progress=progress))
                return {}

            entry, _ = self.cache.get_or_build(key, build, meta)
            _discard_ephemeral(entry)
            if built_runner:
                return built_runner[0]
            return open_simulator(spec, progress=progress)

        entry, _ = self.cache.get_or_build(
            key, lambda dest: compile_blob(spec, dest, progress=progress), meta
        )
        if self.backend == "board":
            from .backends.board import open_board

            return open_board(entry.blob_path, spec, self.options.core_mask)
        from .backends.adb import open_adb

        return open_adb(entry.blob_path, spec, spec.target, self.options.device_id)

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs in model order, in the dtypes the model declares."""
        outs = self._runner.run([np.ascontiguousarray(a) for a in arrays])
        return [_cast(o, dt) for o, dt in zip(outs, self.output_dtypes)]

    def close(self) -> None:
        self._runner.close()


def _discard_ephemeral(entry: Entry) -> None:
    if entry.ephemeral:
        shutil.rmtree(entry.dir, ignore_errors=True)


def _tensor_dtype(arg: Any) -> np.dtype:
    dt = dtype_of(arg.type)
    if dt is None:
        raise Unsupported(f"{arg.name!r} is of type {arg.type}, which the NPU cannot take")
    return dt


def _static_shape(arg: Any) -> tuple[int, ...]:
    if not all(isinstance(d, int) for d in arg.shape):
        raise Unsupported(
            f"{arg.name!r} has dynamic shape {arg.shape}; the NPU needs static shapes "
            "(export the model with fixed shapes)"
        )
    return tuple(arg.shape)


def _cast(out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if out.dtype == dtype:
        return out
    if dtype.kind == "b":
        return out != 0
    if dtype.kind in "iu":
        return np.rint(out).astype(dtype)
    return out.astype(dtype)
