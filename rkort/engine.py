"""The RKNN side of a session: compile a model's static signature through the cache and run it
on the backend this machine has (board NPU, adb board, or the host simulator)."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Runner, RunnerClosed
from .buckets import Oversize, ShapePolicy
from .cache import Cache, Entry, make_key
from .compiler import BuildSpec, compile_blob, toolkit_version
from .errors import InvalidArgument, ort_error
from .feed import cast_output, dtype_of
from .model import ModelSource
from .options import RKNNOptions
from .platform import is_board, toolkit_lite_version
from .program import Program
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
    # Output dims named after input dims take those sizes; only the rest needs inference.
    sizes: dict[Any, int] = {}
    for i, shape in zip(inputs, input_shapes):
        for d, n in zip(i.shape, shape):
            if isinstance(d, str):
                sizes[d] = n
    output_shapes: list[tuple[int, ...] | None] = [
        tuple(d if isinstance(d, int) else sizes[d] for d in o.shape)
        if all(isinstance(d, int) or d in sizes for d in o.shape)
        else None
        for o in outputs
    ]
    if None in output_shapes:
        named = dict(zip((i.name for i in inputs), input_shapes))
        inferred = infer_output_shapes(model.proto, named)
        output_shapes = [s or inferred.get(o.name) for s, o in zip(output_shapes, outputs)]
    if None in output_shapes:
        probed = _probe_output_shapes(model, inputs, input_shapes)
        output_shapes = [s or p for s, p in zip(output_shapes, probed)]
    return BuildSpec(
        model_path=str(model.path),
        input_names=tuple(i.name for i in inputs),
        input_shapes=input_shapes,
        input_dtypes=tuple(_tensor_dtype(i).name for i in inputs),
        output_names=tuple(o.name for o in outputs),
        output_shapes=tuple(s for s in output_shapes if s is not None),
        output_dtypes=tuple(_tensor_dtype(o).name for o in outputs),
        target=options.target,
        quantized_dtype=options.quantized_dtype,
        dataset=options.dataset,
        optimization_level=options.optimization_level,
    )


def _probe_output_shapes(
    model: ModelSource, inputs: Sequence[Any], input_shapes: Sequence[tuple[int, ...]]
) -> list[tuple[int, ...]]:
    """Output shapes for static inputs, read off one onnxruntime run on zeros: the last resort
    when neither the declared names nor ONNX shape inference tell them."""
    import onnxruntime

    source = model.path if model.path.exists() else model.proto.SerializeToString()
    sess = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros(s, _tensor_dtype(i)) for i, s in zip(inputs, input_shapes)}
    return [tuple(o.shape) for o in sess.run(None, feed)]


def blob_key(model: ModelSource, cache: Cache, spec: BuildSpec) -> str:
    """The cache key of one compiled blob: model content, the spec, and the toolchain version
    (and, for one segment of a model, the segment: its file name carries a digest of it)."""
    parts = {"model": model.content_hash(cache), "toolkit": runtime_version(), **spec.key_parts()}
    if Path(spec.model_path) != model.path:
        parts["segment"] = Path(spec.model_path).name
    return make_key(parts)


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


def bucket_specs(
    model: ModelSource,
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    options: RKNNOptions,
    policy: ShapePolicy | None = None,
) -> list[BuildSpec]:
    """The blobs a session with these options compiles for every bucket (one multi-shape spec in
    ``shape_mode=dynamic``); empty when some dim is compiled per observed size."""
    policy = policy or make_policy(model, inputs, outputs, options)
    signatures = policy.signatures()
    if not signatures:
        return []
    names = [i.name for i in inputs]
    specs = [
        plan_spec(model, inputs, outputs, options, dict(zip(names, sig))) for sig in signatures
    ]
    if options.shape_mode == "dynamic" and len(specs) > 1:
        return [replace(specs[-1], dynamic_input=tuple(signatures))]
    return specs


def make_program(
    model: ModelSource,
    directory: str | Path,
    shapes: Mapping[str, Sequence[int]],
    open_npu: Any,
    options: RKNNOptions,
) -> Program:
    """The segmented program a session runs for one input signature (warmup plans the same)."""
    return Program(
        model.proto,
        directory,
        shapes,
        None,
        open_npu,
        model_path=model.path,
        target=options.target,
        quantized_dtype=options.quantized_dtype,
        dataset=options.dataset,
        optimization_level=options.optimization_level,
        force_cpu=[*options.cpu_ops, *options.cpu_nodes],
    )


def make_policy(
    model: ModelSource, inputs: Sequence[Any], outputs: Sequence[Any], options: RKNNOptions
) -> ShapePolicy:
    return ShapePolicy(
        model,
        inputs,
        outputs,
        sequence_buckets=options.buckets,
        batch_buckets=options.batch_buckets,
        pad_values=options.pad_values,
        exact_dims=options.exact_dims,
    )


class _Compiled:
    """What runs one input signature: a Program (NPU and CPU segments), or a runner of one
    multi-shape blob together with the output shapes of that signature."""

    def __init__(
        self,
        program: Program | None = None,
        runner: Runner | None = None,
        output_shapes: tuple[tuple[int, ...], ...] = (),
    ) -> None:
        self.program = program
        self.runner = runner
        self.output_shapes = output_shapes

    def run(self, arrays: list[np.ndarray], on_segment: Any = None) -> list[np.ndarray]:
        if self.program is not None:
            return self.program.run(arrays, on_segment)
        assert self.runner is not None
        return self.runner.run(arrays, self.output_shapes)

    def close(self) -> None:
        if self.program is not None:
            self.program.close()
        if self.runner is not None:
            self.runner.close()


class RKNNEngine:
    """Runs a model on RKNN: inputs padded to a bucket signature, one compiled blob (and one open
    runner, at most ``max_live_shapes`` of them) per signature, outputs sliced back."""

    def __init__(
        self,
        model: ModelSource,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        options: RKNNOptions,
    ) -> None:
        self.options = options
        for arg in [*inputs, *outputs]:
            _tensor_dtype(arg)
        self.backend = choose_backend(options)
        self.cache = Cache(options.cache_dir)
        self._model = model
        self._inputs = list(inputs)
        self._outputs = list(outputs)
        self.input_names = tuple(i.name for i in inputs)
        self.output_names = tuple(o.name for o in outputs)
        self.output_dtypes = tuple(_tensor_dtype(o) for o in outputs)
        self.policy = make_policy(model, inputs, outputs, options)
        self._fp16 = options.quantized_dtype is None
        #: Every signature a runner was opened for, in order (a compile or a cache load each).
        self.opened: list[tuple[tuple[int, ...], ...]] = []
        self._runners: OrderedDict[tuple[tuple[int, ...], ...], _Compiled] = OrderedDict()
        self._segment_dir = Path(tempfile.mkdtemp(prefix="rkort-segments-"))
        weakref.finalize(self, shutil.rmtree, str(self._segment_dir), True)
        self._lock = threading.Lock()
        self._closed = False
        # Open one signature now, so a model RKNN cannot build falls back when the session opens.
        signatures = self.policy.signatures()
        if options.shape_mode == "dynamic" and len(signatures) > 1:
            spec = bucket_specs(model, inputs, outputs, options, self.policy)[0]
            runner = self._open(spec)
            shared = _Shared(runner)
            for sig in signatures:
                self._runners[sig] = _Compiled(
                    runner=shared, output_shapes=self._spec_for(sig).output_shapes
                )
            self.opened.append(spec.input_shapes)
        elif signatures:
            first = self._runner_for(signatures[0])
            if first.program is not None and not first.program.npu_segments:
                self.close()
                reasons = sorted({p.reason for p in first.program.placements if p.device != "npu"})
                raise Unsupported(
                    f"no part of this model can run on the NPU for {options.target}: {'; '.join(reasons[:5])}"
                )

    def _spec_for(self, signature: tuple[tuple[int, ...], ...]) -> BuildSpec:
        shapes = dict(zip(self.input_names, signature)) if not self.policy.static else None
        return plan_spec(self._model, self._inputs, self._outputs, self.options, shapes)

    def _runner_for(self, signature: tuple[tuple[int, ...], ...]) -> _Compiled:
        with self._lock:
            if self._closed:
                raise RunnerClosed("this session's RKNN engine is closed")
            found = self._runners.get(signature)
            if found is not None:
                self._runners.move_to_end(signature)
                return found
            program = make_program(
                self._model,
                self._segment_dir,
                dict(zip(self.input_names, signature)),
                self._open,
                self.options,
            )
            compiled = _Compiled(program=program)
            self.opened.append(signature)
            self._runners[signature] = compiled
            while len(self._runners) > self.options.max_live_shapes:
                _, old = self._runners.popitem(last=False)
                log.info(
                    "closing the least recently used compiled shape of %s", self._model.path.name
                )
                old.close()
            return compiled

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
        try:
            if self.backend == "board":
                from .backends.board import open_board

                return open_board(entry.blob_path, spec, self.options.core_mask)
            from .backends.adb import open_adb

            return open_adb(entry.blob_path, spec, spec.target, self.options.device_id)
        finally:
            _discard_ephemeral(entry)  # the runtime holds the blob once it is open

    def run(
        self,
        arrays: Sequence[np.ndarray],
        profile: dict[str, Any] | None = None,
        on_segment: Any = None,
    ) -> list[np.ndarray] | None:
        """Outputs in model order and declared dtypes; None when onnxruntime should run these
        inputs instead (an empty dim; an oversize input with ``oversize=cpu``)."""
        try:
            plan = self.policy.plan(arrays)
        except Oversize as e:
            if self.options.oversize_to_cpu:
                log.info("%s; running this call on the CPU", e)
                return None
            raise ort_error(InvalidArgument, str(e)) from None
        if plan is None:
            return None
        if self._fp16 and any(_beyond_fp16(a) for a in arrays):
            # An fp16 build would turn these values into inf/NaN: a wrong answer, never given.
            log.info("an input holds values beyond float16's range; running this call on the CPU")
            return None
        if profile is not None:
            profile["signature"] = [list(s) for s in plan.signature]
            profile["chunks"] = len(plan.chunks)
            profile["backend"] = self.backend
        for attempt in range(2):
            compiled = self._runner_for(plan.signature)
            try:
                parts = []
                for chunk in plan.chunks:
                    padded = self.policy.pad(arrays, plan, chunk)
                    outs = compiled.run([np.ascontiguousarray(a) for a in padded], on_segment)
                    parts.append(
                        self.policy.slice_outputs(outs, self.policy.chunk_sizes(plan, chunk))
                    )
                break
            except RunnerClosed:
                if attempt or self._closed:
                    raise
        return [cast_output(o, dt) for o, dt in zip(self.policy.concat(parts), self.output_dtypes)]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            units = list(self._runners.values())
            self._runners.clear()
        for unit in units:
            unit.close()


_FP16_MAX = float(np.finfo(np.float16).max)


def _beyond_fp16(a: np.ndarray) -> bool:
    """True when a float input has a finite value an fp16 blob cannot hold."""
    if a.dtype.kind != "f" or a.dtype == np.float16 or a.size == 0:
        return False
    big = np.abs(a) > _FP16_MAX
    return bool(big.any() and np.isfinite(a[big]).any())


class _Shared(Runner):
    """One multi-shape blob's runner shared by every signature; closed once, by the engine."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner.spec)
        self.name = inner.name
        self._inner = inner

    def run(
        self, inputs: Sequence[np.ndarray], output_shapes: Sequence[tuple[int, ...]] | None = None
    ) -> list[np.ndarray]:
        return self._inner.run(inputs, output_shapes)

    def _run(self, inputs: list[np.ndarray]) -> Sequence[Any]:
        raise NotImplementedError

    def _release(self) -> None:
        self._inner.close()


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
