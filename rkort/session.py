"""``InferenceSession``: onnxruntime's session, with the RKNNExecutionProvider in front of it.

rkort's session *is* an onnxruntime session (a subclass): the onnxruntime CPU session it holds
loads and checks the model exactly as onnxruntime does, answers every metadata question, raises
onnxruntime's errors, and runs the model whenever RKNN cannot. When ``RKNNExecutionProvider`` is
asked for and can run the model, ``run()`` sends valid feeds to the compiled blob instead.
"""

from __future__ import annotations

import collections.abc
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import numpy as np
import onnxruntime as _ort
from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession as _OrtSession

from .backends.base import RunnerDied
from .branching import BranchEngine, open_engine
from .cache import session_cache
from .calls import ORT_ERRORS, RUN, check_terminate, cpu_options, run_context, status_text
from .engine import CpuCall, RKNNEngine
from .errors import EPFail, Unsupported, ort_error
from .face import SHARED as SHARED_FACES
from .face import face_session_options, recorded_face
from .feed import dtype_of, output_indices, prepare
from .iobinding import IOBinding
from .masked import MaskedEngine
from .model import ModelSource
from .options import ALIASES, PROVIDER, RKNNOptions
from .profiling import Profiler
from .spec import CompileError
from .stats import SessionStats

log = logging.getLogger("rkort")

ProviderList = Optional[Sequence[Any]]
#: ``policy(providers, provider_options, model_path=..., sess_options=...)`` -> the providers and
#: options a session really uses; an integration that installs rkort into other people's code
#: sets it (see :func:`set_provider_policy`).
ProviderPolicy = Callable[..., tuple[ProviderList, Optional[Sequence[dict[Any, Any]]]]]
_provider_policy: ProviderPolicy | None = None


def set_provider_policy(policy: ProviderPolicy | None) -> None:
    """Have every session pass its providers through ``policy`` first (None: as given).

    ``rkort.install()`` sets the ``RKORT_AUTO`` rule here; a session class never applies a policy
    of its own.
    """
    global _provider_policy
    _provider_policy = policy


def split_providers(
    providers: ProviderList, provider_options: Sequence[dict[Any, Any]] | None
) -> tuple[dict[str, str] | None, ProviderList, Sequence[dict[Any, Any]] | None]:
    """(RKNN options or None, the other providers, their options), forms kept as given.

    Malformed arguments are passed through untouched so onnxruntime raises its own error.
    """
    if not isinstance(providers, collections.abc.Sequence) or isinstance(providers, str):
        return None, providers, provider_options
    if provider_options is not None and (
        not isinstance(provider_options, collections.abc.Sequence)
        or len(provider_options) != len(providers)
    ):
        return None, providers, provider_options
    rknn: dict[str, str] | None = None
    rest: list[Any] = []
    rest_options: list[dict[Any, Any]] = []
    for i, p in enumerate(providers):
        if (
            isinstance(p, tuple)
            and len(p) == 2
            and isinstance(p[0], str)
            and isinstance(p[1], dict)
        ):
            name, opts = p
        elif isinstance(p, str):
            name = p
            opts = provider_options[i] if provider_options is not None else {}
        else:
            return None, providers, provider_options
        if name in ALIASES:
            if rknn is None:
                rknn = {str(k): str(v) for k, v in opts.items()}
            else:
                log.warning("Duplicate provider '%s' encountered, ignoring.", PROVIDER)
            continue
        rest.append(p)
        if provider_options is not None:
            rest_options.append(provider_options[i])
    if rknn is None:
        return None, providers, provider_options
    if not rest:
        rest = ["CPUExecutionProvider"]
        rest_options = [{}] if provider_options is not None else []
    return rknn, rest, (rest_options if provider_options is not None else None)


class InferenceSession(_OrtSession):
    """onnxruntime's InferenceSession, able to run the model on a Rockchip NPU.

    ``providers=["RKNNExecutionProvider", "CPUExecutionProvider"]`` (or ``"RKNN"``) compiles the
    model to an RKNN blob through rkort's cache and runs it there; provider options: ``target``,
    ``dtype``, ``core_mask``, ``cache_dir``, ``device_id``, ``fallback``, ... (see
    ``rkort.options.KNOWN``). Everything else behaves as onnxruntime's session.
    """

    _rknn: RKNNEngine | BranchEngine | MaskedEngine | None = None
    # onnxruntime's own attributes this class reads and sets.
    _model_path: Any
    _model_bytes: Any
    _providers: list[str]
    _provider_options: dict[str, Any]

    def __init__(
        self,
        path_or_bytes: Any,
        sess_options: _ort.SessionOptions | None = None,
        providers: ProviderList = None,
        provider_options: Sequence[dict[Any, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self._rknn = None
        self._profiler: Profiler | None = None
        self._rknn_options: dict[str, str] = {}
        self._source: ModelSource | None = None
        name = os.path.basename(os.fspath(path_or_bytes)) if _is_path(path_or_bytes) else "<bytes>"
        self._stats = SessionStats(name)
        self._failing = threading.RLock()
        self._causes: set[str] = set()
        self._whole = True
        self._name = name
        self._async: ThreadPoolExecutor | None = None
        #: Why calls run on the CPU while no RKNN engine runs this session.
        self._cpu_reason = f"{PROVIDER} was not asked for"
        super().__init__(path_or_bytes, sess_options, providers, provider_options, **kwargs)
        self._stats.providers = self.get_providers()

    # onnxruntime's __init__ and set_providers() both come through here.
    def _create_inference_session(self, providers, provider_options, disabled_optimizers=None):  # type: ignore[no-untyped-def]
        self._close_rknn()
        if _provider_policy is not None:
            providers, provider_options = _provider_policy(
                providers,
                provider_options,
                model_path=self._model_path,
                sess_options=self._sess_options,
            )
        rknn_options, rest, rest_options = split_providers(providers, provider_options)
        options = RKNNOptions.parse(rknn_options) if rknn_options is not None else None
        self._cpu_args = (rest, rest_options, disabled_optimizers)
        face = self._recorded_face(options) if options is not None else None
        if face is None:
            super()._create_inference_session(rest, rest_options, disabled_optimizers)
        else:
            self._open_on_face(face)
        self._whole = face is None
        self._cpu_reason = f"{PROVIDER} was not asked for"
        if options is not None:
            self._start_rknn(options)
        if self._rknn is None:
            self._load_whole()  # every call runs on the CPU
        self._stats.providers = self.get_providers()

    def _recorded_face(self, options: RKNNOptions) -> bytes | None:
        """The model's face the cache recorded (see :mod:`rkort.face`): with it, the session
        opens without loading the whole model into onnxruntime."""
        try:
            if self._source is None:
                self._source = ModelSource(
                    self._model_path if self._model_path is not None else self._model_bytes
                )
            cache = session_cache(options)
            return recorded_face(cache, self._source.content_hash(cache))
        except Exception:  # noqa: BLE001 - no face: onnxruntime loads the model, and says what is wrong
            return None

    def _open_on_face(self, face: bytes) -> None:
        def create() -> None:
            path, data = self._model_path, self._model_bytes
            self._model_path, self._model_bytes = None, face
            try:
                _OrtSession._create_inference_session(self, *self._cpu_args)
            finally:
                self._model_path, self._model_bytes = path, data

        # Session options of the user's own (threads, profiling, optimized model files...) keep
        # a face session of this session's own; without, sessions share one face session, made
        # without thread pools (it never runs), and each reports onnxruntime's default options.
        if getattr(self, "_sess_options_initial", True) is None:

            def create_shared() -> None:
                self._sess_options = face_session_options()
                create()

            SHARED_FACES.adopt(
                self,
                face,
                (self._cpu_args, getattr(self, "_read_config_from_model", None)),
                create_shared,
            )
            self._sess_options = _ort.SessionOptions()
        else:
            create()

    def _settle(self, engine: RKNNEngine | BranchEngine | MaskedEngine) -> None:
        """The NPU runs the whole model: keep onnxruntime on the model's face only (the whole
        model is loaded again if a call ever needs the CPU)."""
        assert self._source is not None
        face = recorded_face(engine.cache, engine.model_hash)
        if face is None:
            return
        self._open_on_face(face)
        self._whole = False

    def _load_whole(self) -> None:
        """Load the whole model into onnxruntime (once), for a call that runs on the CPU."""
        with self._failing:
            if self._whole:
                return
            providers, options = self._providers, self._provider_options
            _OrtSession._create_inference_session(self, *self._cpu_args)
            if self._rknn is not None:
                self._providers, self._provider_options = providers, options
            self._whole = True
        log.info("%s: the whole model is loaded into onnxruntime for calls on the CPU", self._name)

    def _start_rknn(self, options: RKNNOptions) -> None:
        if self._source is None:
            self._source = ModelSource(
                self._model_path if self._model_path is not None else self._model_bytes
            )
        try:
            engine = open_engine(
                self._source,
                self.get_inputs(),
                self.get_outputs(),
                options,
                self._stats,
                cpu_options(self._sess_options),
            )
        except Exception as e:  # noqa: BLE001 - every RKNN failure means: the next provider runs it
            if not isinstance(e, (Unsupported, CompileError, OSError)):
                if os.environ.get("RKORT_STRICT", "").strip() in ("1", "true", "yes"):
                    self.disable_fallback()  # onnxruntime's retry would hide the bug
                    raise
                log.debug("RKNN setup failed unexpectedly", exc_info=True)
            reason = f"{type(e).__name__}: {e}"
            if not options.fallback:
                raise ort_error(EPFail, f"{PROVIDER} cannot run this model: {reason}") from e
            log.warning(
                "%s cannot run this model, falling back to %s: %s",
                PROVIDER,
                self.get_providers(),
                reason,
            )
            self._cpu_reason = f"{PROVIDER} cannot run this model: {reason}"
            return
        self._rknn = engine
        self._rknn_options = dict(options.raw)
        if engine.npu_only and self._whole:
            self._settle(engine)
        if self.get_session_options().enable_profiling:
            self._profiler = Profiler(self.get_profiling_start_time_ns())
        self._providers = [PROVIDER, *self.get_providers()]
        self._provider_options = {PROVIDER: dict(options.raw), **self.get_provider_options()}

    def _close_rknn(self) -> None:
        engine, self._rknn = self._rknn, None
        if engine is not None:
            engine.close()
        pool, self._async = getattr(self, "_async", None), None
        if pool is not None:
            pool.shutdown(wait=False)

    def __del__(self) -> None:
        try:
            self._close_rknn()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def run(self, output_names, input_feed, run_options=None):  # type: ignore[no-untyped-def]
        """Compute the outputs (all when ``output_names`` is None or empty), as onnxruntime does."""
        engine = self._rknn
        if engine is None:
            outs = super().run(output_names, input_feed, run_options)
            self._stats.cpu(self._cpu_reason)
            return outs
        self._validate_input(list(input_feed.keys()))
        arrays = prepare(input_feed, engine.input_names, *self._input_signature())
        picks = output_indices(output_names, engine.output_names)
        if arrays is None or picks is None:
            # onnxruntime's own session raises its own error for this feed (or, when it takes
            # it after all, computes what onnxruntime would).
            self._load_whole()
            outs = self._sess.run(
                output_names or list(engine.output_names), input_feed, run_options
            )
            self._stats.cpu(
                "a feed onnxruntime takes in a form rkort does not: onnxruntime runs it"
            )
            return outs
        token = RUN.set(run_context(run_options))
        try:
            check_terminate(run_options)
            if self._profiler is None:
                result = engine.run(arrays, stop=lambda: check_terminate(run_options))
            else:
                with self._profiler.event(f"{PROVIDER}_run", provider=PROVIDER) as args:
                    result = engine.run(
                        arrays,
                        args,
                        self._profiler.segment_hook(),
                        stop=lambda: check_terminate(run_options),
                    )
        except CpuCall as e:
            reason = e.reason
        except RunnerDied as e:
            # The device context is gone: as onnxruntime does when an execution provider
            # fails, warn and fall back for good.
            self._rknn_failed(e, engine)
            reason = self._cpu_reason
        except Exception as e:  # noqa: BLE001 - rkort's own bug must not crash the app
            if type(e).__module__ == ORT_ERRORS:
                raise  # onnxruntime's own error for this call (an oversize input, terminate)
            reason = self._unexpected(e, engine)
        else:
            self._stats.npu()
            return _pick(result, picks)
        finally:
            RUN.reset(token)
        self._load_whole()
        outs = self._sess.run(output_names or list(engine.output_names), input_feed, run_options)
        self._stats.cpu(reason)
        return outs

    def _unexpected(self, error: Exception, engine: RKNNEngine | BranchEngine) -> str:
        """An unexpected failure inside rkort's NPU path: this call goes to onnxruntime, with a
        warning once per cause (EPFail with fallback=0; raised as is with RKORT_STRICT=1)."""
        if os.environ.get("RKORT_STRICT", "").strip() in ("1", "true", "yes"):
            raise error
        cause = f"{type(error).__name__}: {error}"
        if not engine.options.fallback:
            raise ort_error(EPFail, f"{PROVIDER} failed on this call: {cause}") from error
        reason = f"an unexpected failure in rkort's NPU path ({cause[:300]})"
        with self._failing:
            first = cause not in self._causes
            self._causes.add(cause)
        if first:
            log.warning(
                "%s: %s; onnxruntime answers this call (please report this rkort bug)",
                self._name,
                reason,
                exc_info=error,
            )
        return reason

    def run_async(self, output_names, input_feed, callback, user_data, run_options=None):  # type: ignore[no-untyped-def]
        """As onnxruntime's: compute on another thread, then ``callback(outputs, user_data, err)``
        (``err`` is "" on success; on failure the outputs are ``[]`` and ``err`` says why). On
        RKNN the calls are served by the session's NPU contexts, several at once."""
        if self._rknn is None:
            return super().run_async(output_names, input_feed, callback, user_data, run_options)
        self._validate_input(list(input_feed.keys()))
        with self._failing:
            if self._async is None:
                parts = getattr(self._rknn, "parts", None)  # a BranchEngine has one per branch
                workers = max(2, len(parts.core_masks()) if parts is not None else 2)
                self._async = ThreadPoolExecutor(workers, thread_name_prefix="rkort-async")
            pool = self._async

        def call() -> None:
            try:
                outputs = self.run(output_names, input_feed, run_options)
            except Exception as e:  # noqa: BLE001 - the callback is told, as onnxruntime does
                callback([], user_data, status_text(e))
                return
            callback(outputs, user_data, "")

        pool.submit(call)

    def _rknn_failed(self, error: Exception, engine: RKNNEngine | BranchEngine) -> None:
        """The device context of ``engine`` is gone: fall back to the next provider (once, even
        when several threads see it), or raise EPFail when fallback is off."""
        reason = f"{type(error).__name__}: {error}"
        if not engine.options.fallback:
            raise ort_error(EPFail, f"{PROVIDER} cannot run this model: {reason}") from error
        with self._failing:
            if self._rknn is not engine:
                return  # another thread already fell back
            log.warning(
                "%s failed, the session now runs on %s: %s",
                PROVIDER,
                self.get_providers()[1:],
                reason,
            )
            self._close_rknn()
        self._cpu_reason = f"{PROVIDER} failed: {reason}"
        self._providers = [p for p in self.get_providers() if p != PROVIDER]
        self._stats.providers = self.get_providers()
        self._provider_options = {
            k: v for k, v in self.get_provider_options().items() if k != PROVIDER
        }

    def end_profiling(self) -> str:
        """End profiling; the trace file also holds one event per run on RKNN."""
        path = super().end_profiling()
        if self._profiler is not None:
            self._profiler.merge_into(path)
        return path

    def _input_signature(self) -> tuple[list[np.dtype], list[list[Any]]]:
        metas = self._inputs_meta
        return [dtype_of(m.type) for m in metas], [m.shape for m in metas]  # type: ignore[misc]

    def run_with_ort_values(self, output_names, input_dict_ort_values, run_options=None):  # type: ignore[no-untyped-def]
        """As onnxruntime's: OrtValues in, OrtValues out."""
        if self._rknn is None:
            outs = super().run_with_ort_values(output_names, input_dict_ort_values, run_options)
            self._stats.cpu(self._cpu_reason)
            return outs
        self._validate_input(list(input_dict_ort_values.keys()))
        feed = {}
        for name, value in input_dict_ort_values.items():
            if not isinstance(value, _ort.OrtValue) or not value.is_tensor():
                self._load_whole()
                outs = super().run_with_ort_values(output_names, input_dict_ort_values, run_options)
                self._stats.cpu("OrtValues that are not CPU tensors: onnxruntime runs them")
                return outs
            feed[name] = value.numpy()
        outs = self.run(output_names, feed, run_options)
        return [_ort.OrtValue.ortvalue_from_numpy(o) for o in outs]

    def io_binding(self) -> _ort.IOBinding:
        """An IOBinding whose CPU inputs a run on RKNN can read."""
        return IOBinding(self)

    def run_with_iobinding(self, iobinding, run_options=None):  # type: ignore[no-untyped-def]
        """Run with bound inputs/outputs; on RKNN when the inputs were bound from CPU arrays."""
        if self._rknn is None or not isinstance(iobinding, IOBinding) or iobinding._opaque:
            self._load_whole()
            if isinstance(iobinding, IOBinding):
                iobinding.rebind(self)
            result = super().run_with_iobinding(iobinding, run_options)
            self._stats.cpu(
                self._cpu_reason
                if self._rknn is None
                else "IOBinding with buffers bound by pointer or on a device: onnxruntime runs it"
            )
            return result
        names = list(iobinding._outputs) or None
        outs = self.run(names, dict(iobinding._inputs), run_options)
        iobinding._set_results(names or list(self._rknn.output_names), outs)


def session_stats(session: _ort.InferenceSession) -> dict[str, Any]:
    """What an rkort session has done: ``npu_calls``, ``cpu_calls`` and ``cpu_reasons`` (reason ->
    calls), ``compiles`` (blobs this session compiled), ``blobs_loaded`` (blobs loaded from the
    cache into a board's runtime), ``missing_shapes`` (shapes the cache lacked, with the
    ``rkort warmup`` command that adds each), and ``providers`` (what it runs on now)."""
    stats = getattr(session, "_stats", None)
    if not isinstance(session, InferenceSession) or not isinstance(stats, SessionStats):
        raise TypeError(
            f"session_stats() takes an rkort InferenceSession, not {type(session).__name__}"
        )
    return stats.as_dict()


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _pick(outs: list[np.ndarray], picks: list[int]) -> list[np.ndarray]:
    seen: set[int] = set()
    result = []
    for i in picks:
        result.append(outs[i].copy() if i in seen else outs[i])
        seen.add(i)
    return result
