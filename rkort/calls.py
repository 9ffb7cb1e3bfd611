"""What a call brings besides its feed: onnxruntime's RunOptions applied to rkort's own work
(``terminate`` between parts, ``logid`` and ``log_severity_level`` on rkort's log records), the
SessionOptions a session's CPU parts take, and errors worded as onnxruntime words them."""

from __future__ import annotations

import contextvars
import logging
import re
from typing import Any

import onnxruntime as _ort

from .errors import Fail, ort_error

log = logging.getLogger("rkort")

ORT_ERRORS = "onnxruntime.capi.onnxruntime_pybind11_state"
#: The RunOptions of the call this thread is making (its log id and severity), for rkort's logs.
RUN: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "rkort_run", default=None
)
_SEVERITY = {
    0: logging.DEBUG,
    1: logging.INFO,
    2: logging.WARNING,
    3: logging.ERROR,
    4: logging.CRITICAL,
}


def run_context(run_options: Any) -> tuple[str, int] | None:
    if run_options is None:
        return None
    tag, severity = (
        getattr(run_options, "logid", ""),
        getattr(run_options, "log_severity_level", -1),
    )
    return (tag, severity) if tag or severity >= 0 else None


def check_terminate(run_options: Any) -> None:
    """onnxruntime's answer to a call whose RunOptions ask it to stop (checked between parts)."""
    if run_options is not None and getattr(run_options, "terminate", False):
        raise ort_error(Fail, "Exiting due to terminate flag being set to true.")


class _RunLogFilter(logging.Filter):
    """rkort's log records during a call follow its RunOptions: its ``logid`` prefixes them, and
    its ``log_severity_level`` (0 verbose .. 4 fatal) drops the records below it."""

    def filter(self, record: logging.LogRecord) -> bool:
        run = RUN.get()
        if run is None:
            return True
        tag, severity = run
        if severity >= 0 and record.levelno < _SEVERITY.get(severity, logging.WARNING):
            return False
        if tag and not getattr(record, "_rkort_tagged", False):
            record.msg = f"[{tag}] {record.msg}"
            record._rkort_tagged = True
        return True


log.addFilter(_RunLogFilter())


def cpu_options(given: Any) -> Any:
    """The SessionOptions for the CPU segments of a session opened with ``given``: the user's
    own (threads, execution mode, custom-op libraries), unless it would make each segment write
    a profile or an optimized model of its own; then a copy of what can be copied."""
    if given is None:
        return None
    if not given.enable_profiling and not given.optimized_model_filepath:
        return given
    copy = _ort.SessionOptions()
    for name in (
        "intra_op_num_threads",
        "inter_op_num_threads",
        "execution_mode",
        "graph_optimization_level",
        "log_severity_level",
        "enable_cpu_mem_arena",
        "enable_mem_pattern",
        "use_deterministic_compute",
    ):
        setattr(copy, name, getattr(given, name))
    return copy


def status_text(error: BaseException) -> str:
    """An error as onnxruntime's run_async callback words it (its status message, no prefix)."""
    text = str(error)
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
