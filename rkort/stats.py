"""Every call counted: answered on the NPU or on the CPU and why, blobs compiled and loaded, shapes
missing from the cache. One :class:`SessionStats` per session (``rkort.session_stats``); the
board rehearsal gathers every session of a process into its report."""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("rkort")

#: Where a rehearsed process writes its report at exit (set by ``rkort run --board``).
REPORT_ENV = "RKORT_REHEARSAL_REPORT"

# Every session's counters this process has had (small objects; the sessions themselves are not
# kept), for the rehearsal's report.
_every: list[SessionStats] = []
_lock = threading.Lock()


class SessionStats:
    """The counters of one session. Thread-safe; each CPU reason is logged once, at INFO."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self.npu_calls = 0
        self.cpu_calls = 0
        self.cpu_reasons: collections.Counter[str] = collections.Counter()
        self.compiles = 0
        self.blobs_loaded = 0
        self.contexts: collections.Counter[str] = collections.Counter()
        #: Shapes a call needed that the cache had no blob for: shape text -> what adds it.
        self.missing_shapes: dict[str, dict[str, Any]] = {}
        self.providers: list[str] = []
        with _lock:
            _every.append(self)

    def npu(self, context: str | None = None) -> None:
        with self._lock:
            self.npu_calls += 1
            if context is not None:
                self.contexts[context] += 1

    def context(self, label: str) -> None:
        """A call ran on the NPU context ``label``."""
        with self._lock:
            self.contexts[label] += 1

    def cpu(self, reason: str) -> None:
        """A call answered by onnxruntime on the CPU, and why (logged the first time)."""
        with self._lock:
            self.cpu_calls += 1
            first = reason not in self.cpu_reasons
            self.cpu_reasons[reason] += 1
        if first:
            log.info("%s: a call runs on the CPU: %s", self.model, reason)

    def compiled(self) -> None:
        with self._lock:
            self.compiles += 1

    def loaded(self) -> None:
        with self._lock:
            self.blobs_loaded += 1

    def missing(self, shape: str, warmup: str) -> bool:
        """Record a shape the cache lacks; True the first time (the caller warns then)."""
        with self._lock:
            found = self.missing_shapes.get(shape)
            if found is not None:
                found["calls"] += 1
                return False
            self.missing_shapes[shape] = {"shape": shape, "warmup": warmup, "calls": 1}
            return True

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "model": self.model,
                "providers": list(self.providers),
                "npu_calls": self.npu_calls,
                "cpu_calls": self.cpu_calls,
                "cpu_reasons": dict(self.cpu_reasons),
                "compiles": self.compiles,
                "blobs_loaded": self.blobs_loaded,
                "contexts": dict(self.contexts),
                "missing_shapes": [dict(m) for m in self.missing_shapes.values()],
            }


def process_report() -> list[dict[str, Any]]:
    """The figures of every session this process has had, live or gone."""
    with _lock:
        every = list(_every)
    return [s.as_dict() for s in every]


def write_process_report() -> None:
    """Write this process's figures into the rehearsal's report directory (at exit)."""
    directory = os.environ.get(REPORT_ENV)
    if not directory:
        return
    sessions = process_report()
    if not sessions:
        return
    path = Path(directory) / f"process-{os.getpid()}.json"
    try:
        path.write_text(json.dumps({"pid": os.getpid(), "sessions": sessions}))
    except OSError as e:
        log.warning("could not write the rehearsal report %s: %s", path, e)
