"""Profiling events for work onnxruntime does not see (runs on RKNN), written into onnxruntime's
own trace file so one trace shows where the time goes."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Profiler:
    """Collects events in onnxruntime's trace format (Chrome trace 'X' events, microseconds
    since the session's profiling start)."""

    def __init__(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @contextmanager
    def event(self, name: str, cat: str = "Node", **args: Any) -> Iterator[dict[str, Any]]:
        """Time the block as one event; the yielded dict may receive more args."""
        begin = time.time_ns()
        extra: dict[str, Any] = {}
        try:
            yield extra
        finally:
            end = time.time_ns()
            record = {
                "cat": cat,
                "pid": os.getpid(),
                "tid": threading.get_native_id(),
                "dur": (end - begin) // 1000,
                "ts": (begin - self.start_ns) // 1000,
                "ph": "X",
                "name": name,
                "args": {**args, **extra},
            }
            with self._lock:
                self._events.append(record)

    def segment_hook(self) -> Any:
        """A ``Program.run`` hook recording one event per segment run (perf_counter clock)."""
        offset = time.time_ns() - time.perf_counter_ns()

        def hook(segment: Any, start_ns: int, end_ns: int) -> None:
            record = {
                "cat": "Node",
                "pid": os.getpid(),
                "tid": threading.get_native_id(),
                "dur": (end_ns - start_ns) // 1000,
                "ts": (start_ns + offset - self.start_ns) // 1000,
                "ph": "X",
                "name": f"segment_{segment.index}_{segment.device}",
                "args": {"device": segment.device, "node_count": segment.node_count},
            }
            with self._lock:
                self._events.append(record)

        return hook

    def merge_into(self, path: str) -> None:
        """Append the events to onnxruntime's trace file ``path`` (a JSON list)."""
        with self._lock:
            events, self._events = self._events, []
        if not events or not path:
            return
        with open(path) as f:
            trace = json.load(f)
        trace.extend(events)
        trace.sort(key=lambda e: e.get("ts", 0))
        tmp = f"{path}.rkort.tmp"
        with open(tmp, "w") as f:
            json.dump(trace, f)
        os.replace(tmp, path)
