"""The RKNN side of a session: compile a model's static signature through the cache and run it
on the backend this machine has (board NPU, adb board, or the host simulator)."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Runner
from .cache import Cache, Entry, make_key
from .compiler import BuildSpec, compile_blob, toolkit_version
from .feed import dtype_of
from .model import ModelSource
from .options import RKNNOptions
from .platform import is_board, toolkit_lite_version
from .shapes import infer_output_shapes

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


def plan_spec(
    model: ModelSource,
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    options: RKNNOptions,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> BuildSpec:
    """The BuildSpec for a model with the given static input shapes (``shapes`` fixes dynamic
    dims; without it every input must be static). Output shapes follow by shape inference."""
    shapes = dict(shapes or {})
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        raise ValueError(
            f"no input named {sorted(unknown)}; the inputs are {[i.name for i in inputs]}"
        )
    input_shapes = tuple(_static_shape(i, shapes.get(i.name)) for i in inputs)
    output_shapes: list[tuple[int, ...]] = []
    inferred: dict[str, tuple[int, ...] | None] | None = None
    for o in outputs:
        if all(isinstance(d, int) for d in o.shape) and not shapes:
            output_shapes.append(tuple(o.shape))
            continue
        if inferred is None:
            inferred = infer_output_shapes(
                model.proto, dict(zip((i.name for i in inputs), input_shapes))
            )
        shape = inferred.get(o.name)
        if shape is None:
            raise Unsupported(f"the shape of output {o.name!r} cannot be inferred statically")
        output_shapes.append(shape)
    return BuildSpec(
        model_path=str(model.path),
        input_names=tuple(i.name for i in inputs),
        input_shapes=input_shapes,
        input_dtypes=tuple(_tensor_dtype(i).name for i in inputs),
        output_names=tuple(o.name for o in outputs),
        output_shapes=tuple(output_shapes),
        output_dtypes=tuple(_tensor_dtype(o).name for o in outputs),
        target=options.target,
        quantized_dtype=options.quantized_dtype,
        dataset=options.dataset,
        optimization_level=options.optimization_level,
    )


def blob_key(model: ModelSource, cache: Cache, spec: BuildSpec) -> str:
    """The cache key of one compiled blob: model content, the spec, and the toolchain version."""
    return make_key(
        {"model": model.content_hash(cache), "toolkit": runtime_version(), **spec.key_parts()}
    )


def _meta(model: ModelSource, spec: BuildSpec) -> dict[str, Any]:
    return {
        "model": str(model.path),
        "target": spec.target,
        "inputs": {n: list(s) for n, s in zip(spec.input_names, spec.input_shapes)},
        "dtype": spec.quantized_dtype or spec.float_dtype,
        "toolkit": runtime_version(),
    }


def compile_to_cache(
    model: ModelSource, spec: BuildSpec, cache: Cache, progress: bool | None = None
) -> tuple[Entry, bool]:
    """Make sure the blob for ``spec`` is in the cache; True when this call compiled it."""
    return cache.get_or_build(
        blob_key(model, cache, spec),
        lambda dest: compile_blob(spec, dest, progress=progress),
        _meta(model, spec),
    )


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
        self.spec = plan_spec(model, inputs, outputs, options)
        self.input_names = self.spec.input_names
        self.output_names = self.spec.output_names
        self.output_dtypes = tuple(np.dtype(d) for d in self.spec.output_dtypes)
        self._runner = self._open(self.spec)

    def _open(self, spec: BuildSpec) -> Runner:
        progress = self.options.progress
        if self.backend == "simulator":
            from .backends.simulator import open_simulator

            # The simulator runs only what it built in-process, so one build both fills the
            # cache (for boards and `rkort warmup`) and serves this session.
            built_runner: list[Runner] = []

            def build(dest: Path) -> dict[str, Any]:
                built_runner.append(open_simulator(spec, export_to=dest, progress=progress))
                return {}

            entry, built = self.cache.get_or_build(
                blob_key(self._model, self.cache, spec), build, _meta(self._model, spec)
            )
            _log_entry(entry, built, spec)
            _discard_ephemeral(entry)
            if built_runner:
                return built_runner[0]
            return open_simulator(spec, progress=progress)

        entry, built = compile_to_cache(self._model, spec, self.cache, progress)
        _log_entry(entry, built, spec)
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


def _log_entry(entry: Entry, built: bool, spec: BuildSpec) -> None:
    shapes = ", ".join(f"{n}={list(s)}" for n, s in zip(spec.input_names, spec.input_shapes))
    if built:
        log.info("compiled %s for %s (%s) into %s", spec.model_name, spec.target, shapes, entry.dir)
    else:
        log.info("using cached blob %s for %s (%s)", entry.key[:12], spec.model_name, shapes)


def _discard_ephemeral(entry: Entry) -> None:
    if entry.ephemeral:
        shutil.rmtree(entry.dir, ignore_errors=True)


def _tensor_dtype(arg: Any) -> np.dtype:
    dt = dtype_of(arg.type)
    if dt is None:
        raise Unsupported(f"{arg.name!r} is of type {arg.type}, which the NPU cannot take")
    return dt


def _static_shape(arg: Any, given: Sequence[int] | None = None) -> tuple[int, ...]:
    if given is not None:
        given = tuple(int(d) for d in given)
        fixed_ok = len(given) == len(arg.shape) and all(
            not isinstance(d, int) or d == g for d, g in zip(arg.shape, given)
        )
        if not fixed_ok:
            raise ValueError(
                f"shape {list(given)} does not fit input {arg.name!r} of shape {arg.shape}"
            )
        return given
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
