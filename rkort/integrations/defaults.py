"""Which providers a session really gets: the policy that puts unchanged apps on the NPU.

An onnxruntime application nobody changed creates its sessions with ``providers=None`` or
``providers=["CPUExecutionProvider"]``. With ``RKORT_AUTO=1`` in the environment (``rkort run``
sets it), such a session runs ``RKNNExecutionProvider`` first, with the CPU behind it for whatever
RKNN cannot run. The rule, checked in this order; the first that applies decides:

1. ``RKORT_AUTO`` is not ``1``/``true``/``yes``/``on``: the session keeps what it asked for.
2. The session names any provider other than the CPU (RKNN itself, CUDA, ...): kept, it chose.
3. Its ``SessionOptions`` say ``add_session_config_entry("rkort.auto", "0")``: kept (the per-session
   opt-out), as is a session that sets ``optimized_model_filepath`` (it exists to write an
   onnxruntime-optimized model).
4. Its model path matches a pattern in ``RKORT_AUTO_EXCLUDE`` (``os.pathsep``-separated globs; a
   pattern without ``/`` is matched against the file name, one with ``/`` against the whole path):
   kept. This opts a model out of an app whose code cannot change.
5. It is created by a tool that asks for the CPU on purpose: ONNX export and its validation
   (``optimum.exporters``), quantization and graph optimization (``onnxruntime.quantization``,
   ``onnxruntime.transformers``, ``onnxruntime.tools``, optimum's optimizer and quantizer), the
   RKNN toolkit, or rkort itself (its CLI, its CPU backend, sessions made while another session is
   being set up): kept. These compare against reference results or rewrite graphs; the NPU's fp16
   would fail them or waste a compile.
6. RKNN is not available on this machine: kept (one warning per process).
7. Otherwise: ``RKNNExecutionProvider`` goes in front, with the options in ``RKORT_AUTO_OPTIONS``
   (``key=value`` pairs separated by ``;``, e.g. ``target=rk3576;buckets=16,32,64``), and the
   session's own providers (the CPU, with its options) stay behind it as the fallback.

The policy runs wherever a session is created, ``set_providers()`` included.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..options import ALIASES, PROVIDER
from ..providers import rknn_available

log = logging.getLogger("rkort")

ENV_AUTO = "RKORT_AUTO"
ENV_OPTIONS = "RKORT_AUTO_OPTIONS"
ENV_EXCLUDE = "RKORT_AUTO_EXCLUDE"
#: Session config entry that opts one session out: ``so.add_session_config_entry("rkort.auto", "0")``.
CONFIG_KEY = "rkort.auto"

_CPU = "CPUExecutionProvider"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# Code that creates CPU sessions on purpose (rule 5), by module name prefix.
_TOOLS = (
    "optimum.exporters",
    "optimum.onnxruntime.optimization",
    "optimum.onnxruntime.quantization",
    "optimum.onnxruntime.preprocessors",
    "onnxruntime.quantization",
    "onnxruntime.transformers",
    "onnxruntime.tools",
    "rknn",
    "rknnlite",
    "rkort",
)
# The frames of session construction itself; they say nothing about who asked for the session.
_CONSTRUCTION = ("rkort.session", "rkort.integrations", "onnxruntime.capi")

_warned_unavailable = False


def auto_enabled() -> bool:
    """True when ``RKORT_AUTO`` asks for the automatic RKNN-first policy."""
    value = os.environ.get(ENV_AUTO, "").strip().lower()
    if value in _TRUE:
        return True
    if value not in _FALSE:
        log.warning("%s=%r is not understood (use 1 or 0); treating it as 0", ENV_AUTO, value)
    return False


def parse_options(text: str) -> dict[str, str]:
    """``"target=rk3576;buckets=16,32"`` -> ``{"target": "rk3576", "buckets": "16,32"}``.

    The keys are checked by the session like any provider options (unknown ones raise
    onnxruntime's ``InvalidArgument``); here only the ``key=value`` form is.
    """
    options: dict[str, str] = {}
    for item in text.split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"{ENV_OPTIONS}: expected key=value pairs separated by ';', got {item.strip()!r}"
            )
        options[key.strip()] = value.strip()
    return options


def excluded(model_path: str | os.PathLike[str] | None, patterns: str | None = None) -> bool:
    """True when ``model_path`` matches one of the ``RKORT_AUTO_EXCLUDE`` patterns."""
    text = os.environ.get(ENV_EXCLUDE, "") if patterns is None else patterns
    if model_path is None or not text:
        return False
    path = os.path.abspath(os.fspath(model_path))
    name = os.path.basename(path)
    for pattern in filter(None, (p.strip() for p in text.split(os.pathsep))):
        if "/" in pattern or os.sep in pattern:
            if fnmatch.fnmatch(path, os.path.abspath(os.path.expanduser(pattern))):
                return True
        elif fnmatch.fnmatch(name, pattern):
            return True
    return False


def _name(entry: Any) -> Any:
    return entry[0] if isinstance(entry, tuple) and entry else entry


def _cpu_only(providers: Sequence[Any] | None) -> bool:
    if providers is None:
        return True
    if isinstance(providers, str) or not isinstance(providers, Sequence):
        return False  # malformed: onnxruntime raises its own error for it
    return all(_name(p) == _CPU for p in providers)


def _opted_out(sess_options: Any) -> bool:
    if sess_options is None:
        return False
    try:
        value = sess_options.get_session_config_entry(CONFIG_KEY)
    except Exception:  # noqa: BLE001 - onnxruntime raises RuntimeError for a key never set
        value = None
    if value is not None and value.strip().lower() in _FALSE - {""}:
        return True
    return bool(getattr(sess_options, "optimized_model_filepath", ""))


def _module_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def created_by_tool() -> str | None:
    """The module of a tool on the call stack that asks for the CPU on purpose (rule 5), if any."""
    frame = sys._getframe(1)
    setups = 0
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if module == "rkort.session" and frame.f_code.co_name == "_create_inference_session":
            setups += 1
            if setups > 1:
                return "rkort.session (a session made while another is set up)"
        elif not _module_under(module, _CONSTRUCTION) and _module_under(module, _TOOLS):
            return module
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _rknn_available() -> bool:
    return rknn_available()


def effective_providers(
    providers: Sequence[Any] | None,
    provider_options: Sequence[dict[Any, Any]] | None,
    *,
    model_path: str | os.PathLike[str] | None = None,
    sess_options: Any = None,
) -> tuple[Sequence[Any] | None, Sequence[dict[Any, Any]] | None]:
    """The providers (and their options) a session really uses, by the rule in this module's doc.

    Returns the arguments unchanged unless the automatic policy moves the session to RKNN; then
    ``RKNNExecutionProvider`` is put in front of the session's own providers (the CPU when it
    named none), in the same form the caller used (names plus ``provider_options``, or tuples).
    """
    if not auto_enabled() or (providers is None and provider_options is not None):
        return providers, provider_options
    if not _cpu_only(providers) or _opted_out(sess_options) or excluded(model_path):
        return providers, provider_options
    tool = created_by_tool()
    if tool is not None:
        log.debug("%s: a session created by %s keeps providers %s", ENV_AUTO, tool, providers)
        return providers, provider_options
    if not _rknn_available():
        global _warned_unavailable
        if not _warned_unavailable:
            _warned_unavailable = True
            log.warning(
                "%s=1 but %s is not available here (no rknn-toolkit-lite2 or rknn-toolkit2): "
                "sessions keep the CPU",
                ENV_AUTO,
                PROVIDER,
            )
        return providers, provider_options
    options = parse_options(os.environ.get(ENV_OPTIONS, ""))
    rest = list(providers) if providers else [_CPU]
    log.info(
        "%s: %s runs on %s first, then %s",
        ENV_AUTO,
        os.fspath(model_path) if model_path is not None else "a model from bytes",
        PROVIDER,
        [_name(p) for p in rest],
    )
    if provider_options is not None and providers:
        return [PROVIDER, *rest], [options, *provider_options]
    return [(PROVIDER, options) if options else PROVIDER, *rest], None


def is_rknn_name(name: Any) -> bool:
    """True for ``RKNNExecutionProvider`` and its short alias ``RKNN``."""
    return isinstance(name, str) and name in ALIASES


def canonical_provider(name: Any) -> Any:
    """``"RKNN"`` -> ``"RKNNExecutionProvider"``; any other value unchanged."""
    return PROVIDER if is_rknn_name(name) else name
