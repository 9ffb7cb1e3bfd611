"""The RKNN side of a session: inputs padded to a bucket signature, one program per signature
(decided by the planner, its blobs through the cache, run on the backend this machine has),
outputs sliced back. A call the NPU cannot answer goes to the CPU for that call only, counted."""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import backends
from .backends.base import Runner, RunnerClosed, RunnerDied, RunnerError
from .backends.pool import Budget, ContextPool
from .buckets import NotWarmed, Oversize
from .cache import Cache, session_cache
from .calibration import InputRecorder
from .decision import Decision, Part
from .errors import InvalidArgument, Unsupported, ort_error
from .feed import cast_output, contiguous, dtype_of
from .hints import warmup_command
from .model import ModelSource
from .multishape import multi_shape_part, open_multi_shape  # noqa: F401  (cli.warmup reads it here)
from .options import RKNNOptions
from .padding import make_policy  # noqa: F401  (cli.warmup reads it here)
from .parts import MissingBlob, PartOpener
from .planner import Planner
from .program import Program
from .shapes import signature_of
from .spec import CompileError
from .stats import SessionStats
from .traffic import ShapeRecorder, fitted_signatures

log = logging.getLogger("rkort")

Signature = tuple[tuple[int, ...], ...]


class CpuCall(Exception):
    """This call runs on the CPU (onnxruntime answers it), for ``reason``; RKNN stays."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RKNNEngine:
    """Runs a model on RKNN: inputs padded to a bucket signature, one program (and its open
    runners, for at most ``max_live_shapes`` signatures) per signature, outputs sliced back.

    Where nothing can compile (a board without the converter), the signatures are the ones
    warmed into the cache. A signature that cannot run on the NPU (missing from the cache, a
    blob the runtime refuses, a build that fails) is remembered and its calls go to the CPU
    (:class:`CpuCall`); only a device that is gone (RunnerDied) ends RKNN for the session.
    """

    def __init__(
        self,
        model: ModelSource,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        options: RKNNOptions,
        stats: SessionStats | None = None,
        cpu_options: Any = None,
        cache: Cache | None = None,
    ) -> None:
        self.options = options
        self._cpu_options = cpu_options
        for arg in [*inputs, *outputs]:
            _tensor_dtype(arg)
        self.backend = backends.choose(options)
        self.cache = cache if cache is not None else session_cache(options)
        self.stats = stats if stats is not None else SessionStats(model.path.name)
        self._model = model
        self.planner = Planner(model, options, self.cache)
        self.parts = PartOpener(self.planner, self.backend, options, self.stats)
        self.input_names = tuple(i.name for i in inputs)
        self.output_names = tuple(o.name for o in outputs)
        self.output_dtypes = tuple(_tensor_dtype(o) for o in outputs)
        self.policy = make_policy(model, inputs, outputs, options, self.cache, cpu_options)
        self._fp16 = options.quantized_dtype is None
        #: Every signature a program was opened for, in order (a compile or a cache load each).
        self.opened: list[Signature] = []
        self._programs: OrderedDict[Signature, Program] = OrderedDict()
        self._failed: dict[Signature, str] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._opening: dict[Signature, threading.Lock] = {}
        #: True when the program opened at setup runs on the NPU alone (no CPU segment).
        self.npu_only = False
        self._chunks: ThreadPoolExecutor | None = None
        self.budget = Budget(options.memory_budget or default_budget())
        self._recorder: ShapeRecorder | None = None
        if options.record_shapes:
            self._recorder = ShapeRecorder(self.cache, self.planner.model_hash, self.input_names)
            atexit.register(self._recorder.flush)
        self._feeds: InputRecorder | None = None
        if options.record_inputs:
            self._feeds = InputRecorder(
                self.cache, self.planner.model_hash, self.input_names, options.record_inputs
            )
        try:
            self._open_first()
        except BaseException:
            self.close()
            raise

    @property
    def model_hash(self) -> str:
        return self.planner.model_hash

    # -- opening --

    def _open_first(self) -> None:
        """Open one program now, so a model RKNN cannot run falls back when the session opens."""
        if not self.parts.can_build:
            warmed = [
                tuple(d.signature[n] for n in self.input_names)
                for d in self.planner.warmed()
                if d.npu_parts and set(d.signature) == set(self.input_names)
            ]
            if not warmed:
                raise Unsupported(
                    f"the cache at {self.cache.root} holds no compiled blob of "
                    f"{self._model.path.name} for {self.options.target} ({self._dtype}), and "
                    "there is no converter here to build one; on a build host run "
                    f"`{self._warmup_command(None)}` and copy the cache here"
                )
            self.policy.restrict(warmed)
            candidates = list(self.policy.allowed or [])
        else:
            fitted = None
            if self.options.buckets is None and not self.policy.static:
                fitted = fitted_signatures(self.cache, self.planner.model_hash)
            if fitted:
                self.policy.restrict(fitted, fallback=True)  # `rkort warmup --from-traffic`
            candidates = list(self.policy.allowed or []) or self.policy.signatures()
            if self.options.shape_mode == "dynamic" and len(candidates) > 1:
                self._open_multi_shape(candidates)
                if self._programs:
                    return
            if not candidates:
                self._check_npu_work()
                return
            candidates = candidates[:1]  # a failed build here is worth trying only once
        problems = []
        for sig in candidates:
            try:
                program = self._program_for(sig)
            except CpuCall as e:
                problems.append(e.reason)
                continue
            program.release()
            if not program.npu_segments:
                raise Unsupported(
                    f"no part of this model can run on the NPU for {self.options.target}: "
                    f"{'; '.join(program.decision.cpu_reasons[:5])}"
                )
            if all(s.device == "npu" for s in program.segments):
                self.npu_only = True
                self.planner.drop_model()  # the NPU holds it all: no parsed copy stays here
            return
        raise Unsupported("; ".join(dict.fromkeys(problems)))

    def _check_npu_work(self) -> None:
        """For a model whose dims are all compiled per size: some node must be NPU work."""
        # The rules alone: a model may not run at all at the size-1 stand-in signature (a
        # detector's 1x1 image), and nothing is built for it.
        plan = self.planner.place(signature_of(self._model.proto, {}, fill=1))
        if not any(s.device == "npu" for s in plan.segments):
            reasons = sorted({p.reason for p in plan.placements if p.device != "npu"})
            raise Unsupported(
                f"no part of this model can run on the NPU for {self.options.target}: "
                f"{'; '.join(reasons[:5])}"
            )

    def _open_multi_shape(self, signatures: list[Signature]) -> None:
        programs = open_multi_shape(self.planner, self.parts, [self._named(s) for s in signatures])
        for sig, program in zip(signatures, programs):
            self._programs[sig] = program
        if programs:
            self.opened.append(signatures[-1])

    def _named(self, signature: Signature) -> dict[str, tuple[int, ...]]:
        return dict(zip(self.input_names, signature))

    def _program_for(self, signature: Signature) -> Program:
        """The program of ``signature``, acquired for one call (release it after). Opening one
        (a build, a blob load) holds only that signature's lock: other signatures run meanwhile."""
        while True:
            with self._lock:
                found = self._known(signature)
                if found is not None:
                    return found
                opening = self._opening.setdefault(signature, threading.Lock())
            with opening:
                with self._lock:
                    found = self._known(signature)
                    if found is not None:
                        return found
                try:
                    program = self._open_program(signature)
                except MissingBlob:
                    raise CpuCall(self._missing(signature)) from None
                except (CompileError, RunnerError, OSError) as e:
                    shape = _shape_text(self.input_names, signature)
                    reason = (
                        f"the NPU program for {shape} could not be opened: {type(e).__name__}: {e}"
                    )
                    with self._lock:
                        self._failed[signature] = reason
                    log.warning("%s: %s; calls of this shape run on the CPU", self._name, reason)
                    raise CpuCall(reason) from e
                finally:
                    with self._lock:
                        self._opening.pop(signature, None)
                with self._lock:
                    if self._closed:
                        program.close()
                        raise RunnerClosed("this session's RKNN engine is closed")
                    self.opened.append(signature)
                    self._remember(signature, program)
                    program.acquire()
                    return program

    def _known(self, signature: Signature) -> Program | None:
        """The open program of ``signature``, acquired; None when it must be opened. (Holding
        the engine lock.)"""
        if self._closed:
            raise RunnerClosed("this session's RKNN engine is closed")
        failed = self._failed.get(signature)
        if failed is not None:
            raise CpuCall(failed)
        found = self._programs.get(signature)
        if found is not None:
            self._programs.move_to_end(signature)
            found.acquire()
        return found

    def _open_program(self, signature: Signature) -> Program:
        named = self._named(signature)
        can_build = self.parts.can_build
        masks = self.parts.core_masks()
        decision, handles = self.planner.decide(
            named, (lambda part: self.parts.build(part, named, masks[0])) if can_build else None
        )
        if not can_build and not decision.recorded:
            raise MissingBlob(f"no program record for {named}")
        several = len(decision.npu_parts) > 1

        def open_npu(part: Part) -> Runner:
            first = handles.pop(part.key or "", None)
            if first is None:
                first = self.parts.open(decision, part, masks[0])

            def context(slot: int) -> Runner:
                return first if slot == 0 else self.parts.open(decision, part, masks[slot])

            where = f"part {part.index}, " if several else ""
            return ContextPool(
                context,
                len(masks),
                cost=first.memory,
                budget=self.budget,
                labels=[
                    f"{where}{_context_label(self.backend.name, m, i)}" for i, m in enumerate(masks)
                ],
                on_call=self.stats.context,
            )

        constants = (
            self.planner.files(dict(decision.signature)).constants(decision.constant_outputs)
            if decision.constant_outputs
            else {}
        )
        program = Program(decision, open_npu, lambda part: self._cpu(decision, part), constants)
        self.planner.forget(named)  # loaded: its segment files and prepared graph can go
        return program

    def _remember(self, signature: Signature, program: Program) -> None:
        """Keep ``program``; retire the least recently used ones beyond ``max_live_shapes`` or
        the memory budget (the newest always stays). (Holding the engine lock.)"""
        self._programs[signature] = program
        while len(self._programs) > 1 and (
            len(self._programs) > self.options.max_live_shapes or self.budget.over
        ):
            old_sig, old = self._programs.popitem(last=False)
            log.info("closing the least recently used compiled shape of %s", self._name)
            old.retire()
            self.planner.forget(self._named(old_sig))

    def _cpu(self, decision: Decision, part: Part) -> tuple[Any, Path]:
        # onnxruntime's own class, even when rkort.install() has put rkort's in its place.
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

        path = self.planner.cpu_file(decision, part)
        session = InferenceSession(str(path), self._cpu_options, providers=["CPUExecutionProvider"])
        return session, path

    # -- shapes missing from the cache --

    @property
    def _name(self) -> str:
        return self._model.path.name

    @property
    def _dtype(self) -> str:
        return self.options.quantized_dtype or "fp16"

    def _missing(self, signature: Signature | None, arrays: Sequence[np.ndarray] = ()) -> str:
        """Remember (and warn once about) a shape the cache lacks; the reason for the call."""
        reason = "shape missing from the cache"
        if signature is not None:
            self._failed.setdefault(signature, reason)
        shapes = signature if signature is not None else tuple(a.shape for a in arrays)
        shape = _shape_text(self.input_names, shapes)
        command = self._warmup_command(signature)
        if self.stats.missing(shape, command):
            log.warning(
                "%s: the cache at %s has no compiled blob for %s (%s, %s); calls of this shape run "
                "on the CPU. A build host adds it with: %s",
                self._name,
                self.cache.root,
                shape,
                self.options.target,
                self._dtype,
                command,
            )
        return reason

    def _warmup_command(self, signature: Signature | None) -> str:
        return warmup_command(
            self._model.path, self.options, self.policy, self.input_names, signature
        )

    # -- running --

    def run(
        self,
        arrays: Sequence[np.ndarray],
        profile: dict[str, Any] | None = None,
        on_segment: Any = None,
        stop: Callable[[], None] | None = None,
    ) -> list[np.ndarray]:
        """Outputs in model order and declared dtypes. Raises :class:`CpuCall` when onnxruntime
        should answer this call instead (and why). ``stop()`` is called between parts of the
        call; what it raises ends the call (onnxruntime's RunOptions.terminate)."""
        if stop is not None:
            on_segment = _then_stop(on_segment, stop)
        if self._recorder is not None:
            self._recorder.record(arrays)
        if self._feeds is not None:
            self._feeds.record(arrays)
        try:
            plan = self.policy.plan(arrays)
        except Oversize as e:
            if self.options.oversize_to_cpu:
                raise CpuCall(f"longer than the largest bucket ({e})") from None
            raise ort_error(InvalidArgument, str(e)) from None
        except NotWarmed as e:
            raise CpuCall(self._missing(e.wanted, arrays)) from None
        if plan is None:
            raise CpuCall("an empty dimension, or sizes that disagree for one dim")
        if self._fp16 and any(_beyond_fp16(a) for a in arrays):
            # An fp16 build would turn these values into inf/NaN: a wrong answer, never given.
            raise CpuCall("an input holds values beyond float16's range")
        if profile is not None:
            profile["signature"] = [list(s) for s in plan.signature]
            profile["chunks"] = len(plan.chunks)
            profile["backend"] = self.backend.name
        for attempt in range(2):
            program = self._program_for(plan.signature)
            try:
                parts = self._run_chunks(program, arrays, plan, on_segment)
                break
            except RunnerClosed:
                if attempt or self._closed:
                    raise
            except RunnerDied:
                raise
            except RunnerError as e:
                # The runtime refused this very feed and still works: onnxruntime answers it.
                raise CpuCall(f"the NPU runtime refused this call: {e}") from e
            finally:
                program.release()
        outputs = [
            cast_output(o, dt) for o, dt in zip(self.policy.concat(parts), self.output_dtypes)
        ]
        if any(o.dtype.kind == "f" and not np.isfinite(o).all() for o in outputs):
            # float16 overflowed somewhere inside (or the model itself makes inf/NaN): a number
            # that cannot be trusted is never returned; onnxruntime computes this call.
            raise CpuCall("inf or NaN in the NPU's outputs (float16 overflow inside the model?)")
        return outputs

    def _run_chunks(
        self, program: Program, arrays: Sequence[np.ndarray], plan: Any, on_segment: Any
    ) -> list[list[np.ndarray]]:
        """Each batch chunk through ``program``; several chunks at once on several contexts."""

        def one(chunk: slice) -> list[np.ndarray]:
            padded = self.policy.pad(arrays, plan, chunk)
            outs = program.run([contiguous(a) for a in padded], on_segment)
            return self.policy.slice_outputs(
                outs, self.policy.chunk_sizes(plan, chunk), plan.signature
            )

        if len(plan.chunks) == 1 or len(self.parts.core_masks()) == 1:
            return [one(chunk) for chunk in plan.chunks]
        with self._lock:
            if self._chunks is None:
                self._chunks = ThreadPoolExecutor(
                    len(self.parts.core_masks()), thread_name_prefix="rkort-chunk"
                )
        return list(self._chunks.map(one, plan.chunks))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            programs = list(self._programs.values())
            self._programs.clear()
            chunks, self._chunks = self._chunks, None
        for program in programs:
            program.retire()
        if chunks is not None:
            chunks.shutdown(wait=False)
        self.planner.close()
        if self._recorder is not None:
            self._recorder.flush()


_FP16_MAX = float(np.finfo(np.float16).max)


def _beyond_fp16(a: np.ndarray) -> bool:
    """True when a float input has a finite value an fp16 blob cannot hold."""
    if a.dtype.kind != "f" or a.dtype == np.float16 or a.size == 0:
        return False
    big = np.abs(a) > _FP16_MAX
    return bool(big.any() and np.isfinite(a[big]).any())


def _then_stop(hook: Any, stop: Callable[[], None]) -> Any:
    def after(segment: Any, start: int, end: int) -> None:
        if hook is not None:
            hook(segment, start, end)
        stop()

    return after


def default_budget() -> int:
    """A quarter of the machine's memory, at most the 4 GiB an RK35xx NPU addresses."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        total = 8 << 30
    return min(total // 4, 4 << 30)


def _context_label(backend: str, mask: int | None, slot: int) -> str:
    if mask is None:
        return f"{backend} context {slot}"
    cores = [str(c) for c in range(16) if mask & (1 << c)]
    return f"NPU core{'s' if len(cores) > 1 else ''} {'+'.join(cores)}"


def _shape_text(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> str:
    return ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in zip(names, shapes))


def _tensor_dtype(arg: Any) -> np.dtype:
    dt = dtype_of(arg.type)
    if dt is None:
        raise Unsupported(f"{arg.name!r} is of type {arg.type}, which the NPU cannot take")
    return dt
