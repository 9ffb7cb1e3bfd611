"""The RKNN side of a session: inputs padded to a bucket signature, one program per signature
(decided by the planner, its blobs through the cache, run on the backend this machine has),
outputs sliced back."""

from __future__ import annotations

import logging
import shutil
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import backends
from .backends.base import Opening, Runner, RunnerClosed
from .buckets import Oversize, ShapePolicy
from .cache import Cache, Entry
from .compiler import compile_blob
from .decision import Decision, Part
from .errors import InvalidArgument, Unsupported, ort_error
from .feed import cast_output, dtype_of
from .model import ModelSource
from .options import RKNNOptions
from .planner import Planner
from .platform import toolkit_lite_version, toolkit_version
from .program import Program
from .spec import BuildSpec

log = logging.getLogger("rkort")

Signature = tuple[tuple[int, ...], ...]


def runtime_version() -> str:
    """The RKNN toolchain version blobs are made for: the converter's, else the board runtime's."""
    return toolkit_version() or toolkit_lite_version() or "unknown"


def blob_meta(model: ModelSource, spec: BuildSpec) -> dict[str, Any]:
    """What a cache entry says about the blob it holds."""
    return {
        "model": str(model.path),
        "target": spec.target,
        "inputs": {n: list(s) for n, s in zip(spec.input_names, spec.input_shapes)},
        "dtype": spec.quantized_dtype or spec.float_dtype,
        "toolkit": runtime_version(),
    }


def compile_to_cache(
    planner: Planner, decision: Decision, part: Part, progress: bool | None = None
) -> tuple[Entry, bool]:
    """Make sure the blob of an NPU part is in the cache; True when this call compiled it."""
    assert part.spec is not None and part.key is not None
    planner.ensure_file(decision, part)
    spec = part.spec
    return planner.cache.get_or_build(
        part.key,
        lambda dest: compile_blob(spec, dest, progress=progress),
        blob_meta(planner.source, spec),
    )


def make_policy(
    model: ModelSource, inputs: Sequence[Any], outputs: Sequence[Any], options: RKNNOptions
) -> ShapePolicy:
    """The shape rules a session with these options follows (which dims pad to which buckets)."""
    return ShapePolicy(
        model,
        inputs,
        outputs,
        sequence_buckets=options.buckets,
        batch_buckets=options.batch_buckets,
        pad_values=options.pad_values,
        exact_dims=options.exact_dims,
    )


def multi_shape_part(
    planner: Planner, signatures: Sequence[Mapping[str, Sequence[int]]]
) -> Part | None:
    """One NPU part holding every signature (``shape_mode=dynamic``: the toolkit's
    ``dynamic_input``), or None when the placement keeps part of the model off the NPU for some
    signature (then one blob per bucket runs the same placement instead)."""
    decisions = [planner.decide(sig)[0] for sig in signatures]
    if not all(len(d.parts) == 1 and d.parts[0].source != "segment" for d in decisions):
        log.info(
            "shape_mode=dynamic: part of %s runs on the CPU, so each bucket gets a blob of its own",
            planner.source.path.name,
        )
        return None
    last = decisions[-1].parts[0]
    assert last.spec is not None
    spec = replace(last.spec, dynamic_input=tuple(d.parts[0].spec.input_shapes for d in decisions))  # type: ignore[union-attr]
    return replace(last, spec=spec, key=planner.blob_key(spec, last.source, last.nodes))


class RKNNEngine:
    """Runs a model on RKNN: inputs padded to a bucket signature, one program (and its open
    runners, for at most ``max_live_shapes`` signatures) per signature, outputs sliced back."""

    def __init__(
        self,
        model: ModelSource,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        options: RKNNOptions,
        sess_options: Any = None,
    ) -> None:
        self.options = options
        for arg in [*inputs, *outputs]:
            _tensor_dtype(arg)
        self.backend = backends.choose(options)
        self.cache = Cache(options.cache_dir)
        self._model = model
        self._sess_options = sess_options
        self.planner = Planner(model, options, self.cache)
        self.input_names = tuple(i.name for i in inputs)
        self.output_names = tuple(o.name for o in outputs)
        self.output_dtypes = tuple(_tensor_dtype(o) for o in outputs)
        self.policy = make_policy(model, inputs, outputs, options)
        self._fp16 = options.quantized_dtype is None
        #: Every signature a program was opened for, in order (a compile or a cache load each).
        self.opened: list[Signature] = []
        self._programs: OrderedDict[Signature, Program] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        # Open one signature now, so a model RKNN cannot run falls back when the session opens.
        signatures = self.policy.signatures()
        if options.shape_mode == "dynamic" and len(signatures) > 1:
            self._open_multi_shape(signatures)
        if signatures and not self._programs:
            first = self._program_for(signatures[0])
            if not first.npu_segments:
                self.close()
                raise Unsupported(
                    f"no part of this model can run on the NPU for {options.target}: "
                    f"{'; '.join(first.decision.cpu_reasons[:5])}"
                )

    # -- programs --

    def _named(self, signature: Signature) -> dict[str, tuple[int, ...]]:
        return dict(zip(self.input_names, signature))

    def _program_for(self, signature: Signature) -> Program:
        with self._lock:
            if self._closed:
                raise RunnerClosed("this session's RKNN engine is closed")
            found = self._programs.get(signature)
            if found is not None:
                self._programs.move_to_end(signature)
                return found
            build = self._build if self._can_build() else None
            decision, handles = self.planner.decide(self._named(signature), build)

            def open_npu(part: Part) -> Runner:
                handle = handles.pop(part.key or "", None)
                return handle if handle is not None else self._open(decision, part)

            constants = (
                self.planner.files(dict(decision.signature)).constants(decision.constant_outputs)
                if decision.constant_outputs
                else {}
            )
            program = Program(decision, open_npu, lambda part: self._cpu(decision, part), constants)
            self.opened.append(signature)
            self._remember(signature, program)
            return program

    def _remember(self, signature: Signature, program: Program) -> None:
        self._programs[signature] = program
        while len(self._programs) > self.options.max_live_shapes:
            old_sig, old = self._programs.popitem(last=False)
            log.info("closing the least recently used compiled shape of %s", self._model.path.name)
            old.close()
            self.planner.forget(self._named(old_sig))

    def _open_multi_shape(self, signatures: list[Signature]) -> None:
        part = multi_shape_part(self.planner, [self._named(s) for s in signatures])
        if part is None:
            return
        decision = self.planner.decide(self._named(signatures[-1]))[0]
        runner = _Shared(self._open(decision, part))
        for sig in signatures:
            one = self.planner.decide(self._named(sig))[0]
            shaped = _Shaped(runner, one.parts[0].spec.output_shapes)  # type: ignore[union-attr]
            self._programs[sig] = Program(one, _Always(shaped), self._no_cpu)
        self.opened.append(part.spec.input_shapes)  # type: ignore[union-attr]

    def _can_build(self) -> bool:
        return self.backend.builds or toolkit_version() is not None

    def _build(self, part: Part) -> Runner:
        """A trial build of an NPU part that also opens it (through the cache)."""
        assert part.spec is not None and part.key is not None
        spec, progress = part.spec, self.options.progress
        if self.backend.builds:
            # The simulator runs only what it built in-process, so one build both fills the
            # cache (for boards and `rkort warmup`) and serves this session.
            built: list[Runner] = []

            def build(dest: Path) -> dict[str, Any]:
                built.append(self.backend.open(Opening(spec, export_to=dest, progress=progress)))
                return {}

            entry, made = self.cache.get_or_build(part.key, build, blob_meta(self._model, spec))
            _log_entry(entry, made, spec)
            _discard_ephemeral(entry)
            return built[0] if built else self.backend.open(Opening(spec, progress=progress))
        entry, made = self.cache.get_or_build(
            part.key,
            lambda dest: compile_blob(spec, dest, progress=progress),
            blob_meta(self._model, spec),
        )
        _log_entry(entry, made, spec)
        try:
            return self.backend.open(Opening(spec, blob=entry.blob_path, options=self.options))
        finally:
            _discard_ephemeral(entry)  # the runtime holds the blob once it is open

    def _open(self, decision: Decision, part: Part) -> Runner:
        """Open an NPU part no trial build opened (its decision came from the cache's record)."""
        self.planner.ensure_file(decision, part)
        return self._build(part)

    def _cpu(self, decision: Decision, part: Part) -> tuple[Any, Path]:
        # onnxruntime's own class, even when rkort.install() has put rkort's in its place.
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

        path = self.planner.cpu_file(decision, part)
        return InferenceSession(str(path), providers=["CPUExecutionProvider"]), path

    @staticmethod
    def _no_cpu(part: Part) -> tuple[Any, Path]:
        raise AssertionError("a multi-shape program has no CPU part")

    # -- running --

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
            profile["backend"] = self.backend.name
        for attempt in range(2):
            program = self._program_for(plan.signature)
            try:
                parts = []
                for chunk in plan.chunks:
                    padded = self.policy.pad(arrays, plan, chunk)
                    outs = program.run([np.ascontiguousarray(a) for a in padded], on_segment)
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
            programs = list(self._programs.values())
            self._programs.clear()
        for program in programs:
            program.close()
        self.planner.close()


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


class _Shaped(Runner):
    """The shared multi-shape runner seen by one signature: its outputs take that signature's
    shapes; closing it leaves the shared runner open."""

    def __init__(self, shared: _Shared, output_shapes: tuple[tuple[int, ...], ...]) -> None:
        super().__init__(shared.spec)
        self.name = shared.name
        self._shared = shared
        self._shapes = output_shapes

    def run(
        self, inputs: Sequence[np.ndarray], output_shapes: Sequence[tuple[int, ...]] | None = None
    ) -> list[np.ndarray]:
        return self._shared.run(inputs, output_shapes or self._shapes)

    def _run(self, inputs: list[np.ndarray]) -> Sequence[Any]:
        raise NotImplementedError

    def _release(self) -> None:
        pass


class _Always:
    """An ``open_npu`` that gives every part the same runner."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def __call__(self, part: Part) -> Runner:
        return self.runner


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
