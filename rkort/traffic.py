"""Recorded traffic: the input shapes a model really sees (shapes only, never data), kept per model
in the cache directory, and the signatures fitted to them (`rkort buckets`, `rkort warmup
--from-traffic`).

    root/traffic/<model hash>/shapes.json    {"version": 1, "inputs": [...], "calls": n,
                                              "dropped": n, "counts": [[signature, n], ...]}
    root/traffic/<model hash>/shapes.lock    the file lock every merge holds
    root/traffic/<model hash>/fitted.json    {"version": 1, "inputs": [...], "signatures": [...],
                                              ...what they were fitted to}

A session with ``record_shapes=1`` counts its calls' shapes in memory (a dict update under a
lock: about a microsecond) and merges them into ``shapes.json`` at most once a minute, when it
closes and at exit: under the file lock, read, add, write to a temporary file and rename, so
concurrent processes never lose each other's counts and readers never see a partial file. Memory
and file are bounded (:data:`MAX_PENDING` shapes in memory, :data:`MAX_KEPT` in the file, the
rarest dropped and counted). Files are private (0600) in private directories (0700), like the
cache. Recording never fails a session: a cache it cannot write is logged at DEBUG and the
counts kept (bounded) for the next try.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .cache import Cache
from .files import read_json, write_atomic

log = logging.getLogger("rkort")

Signature = tuple[tuple[int, ...], ...]
FORMAT = 1
#: A session merges what it counted into the file at most this often (seconds), and at close/exit.
FLUSH_SECONDS = 60.0
#: Distinct shapes one session holds in memory before it merges early (or, failing, drops new ones).
MAX_PENDING = 4096
#: Distinct shapes kept in a model's file; beyond, the rarest are dropped (their calls counted).
MAX_KEPT = 20000
#: How long a merge waits for another process's merge (seconds) before it tries again later.
LOCK_TIMEOUT = 2.0
_FILE_LIMIT = 64 << 20


def traffic_dir(cache: Cache, model_hash: str) -> Path:
    return cache.root / "traffic" / model_hash


@dataclass
class Traffic:
    """A model's recorded shapes: input names, calls per signature, calls not kept."""

    inputs: list[str]
    counts: Counter[Signature] = field(default_factory=Counter)
    dropped: int = 0

    @property
    def calls(self) -> int:
        return sum(self.counts.values()) + self.dropped


class ShapeRecorder:
    """Counts the input shapes of one session's calls and merges them into the model's file."""

    def __init__(self, cache: Cache, model_hash: str, input_names: Sequence[str]) -> None:
        self.cache = cache
        self.model_hash = model_hash
        self.input_names = list(input_names)
        self._counts: dict[Signature, int] = {}
        self._dropped = 0
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._due = time.monotonic() + FLUSH_SECONDS

    def record(self, arrays: Sequence[np.ndarray]) -> None:
        """Count one call's input shapes (cheap; merges into the file when a flush is due)."""
        try:
            signature = tuple(a.shape for a in arrays)
            with self._lock:
                if self._pid != os.getpid():  # a forked child: the parent merges what it counted
                    self._counts, self._dropped, self._pid = {}, 0, os.getpid()
                counts = self._counts
                if signature in counts:
                    counts[signature] += 1
                elif len(counts) < MAX_PENDING:
                    counts[signature] = 1
                else:
                    self._dropped += 1
                due = len(counts) >= MAX_PENDING or time.monotonic() >= self._due
            if due:
                self.flush()
        except Exception as e:  # noqa: BLE001 - recording never fails a call
            log.debug("could not record a call's shapes: %s", e)

    def flush(self) -> None:
        """Merge what was counted since the last flush into the model's shapes file."""
        with self._lock:
            if self._pid != os.getpid():
                self._counts, self._dropped, self._pid = {}, 0, os.getpid()
            counts, dropped = self._counts, self._dropped
            self._counts, self._dropped = {}, 0
            self._due = time.monotonic() + FLUSH_SECONDS
        if not counts and not dropped:
            return
        try:
            merge_counts(self.cache, self.model_hash, self.input_names, counts, dropped)
        except Exception as e:  # noqa: BLE001 - an unwritable cache must not fail the session
            log.debug("could not record shapes in %s: %s", self.cache.root, e)
            with self._lock:  # keep them for the next try, within the bound
                for sig, n in counts.items():
                    if sig in self._counts or len(self._counts) < MAX_PENDING:
                        self._counts[sig] = self._counts.get(sig, 0) + n
                    else:
                        self._dropped += n
                self._dropped += dropped


def merge_counts(
    cache: Cache,
    model_hash: str,
    input_names: Sequence[str],
    counts: Mapping[Signature, int],
    dropped: int = 0,
) -> None:
    """Add ``counts`` to the model's shapes file, under its file lock (atomic for readers)."""
    import filelock

    directory = cache.model_dir("traffic", model_hash)
    lock = filelock.FileLock(str(directory / "shapes.lock"), mode=0o600, timeout=LOCK_TIMEOUT)
    with lock:
        found = read_traffic(cache, model_hash)
        total = found.counts if found is not None else Counter()
        dropped += found.dropped if found is not None else 0
        for sig, n in counts.items():
            total[tuple(tuple(int(d) for d in s) for s in sig)] += int(n)
        if len(total) > MAX_KEPT:
            kept = dict(total.most_common(MAX_KEPT))
            dropped += sum(total.values()) - sum(kept.values())
            total = Counter(kept)
        data = {
            "version": FORMAT,
            "inputs": list(input_names),
            "calls": sum(total.values()) + dropped,
            "dropped": dropped,
            "counts": [[[list(s) for s in sig], n] for sig, n in sorted(total.items())],
        }
        write_atomic(directory / "shapes.json", json.dumps(data).encode())


def read_traffic(cache: Cache, model_hash: str) -> Optional[Traffic]:
    """The shapes recorded for a model, or None when nothing (readable) was recorded."""
    data: Any = read_json(traffic_dir(cache, model_hash) / "shapes.json", _FILE_LIMIT)
    if not isinstance(data, dict) or not isinstance(data.get("counts"), list):
        return None
    found = Traffic([str(n) for n in data.get("inputs", [])], Counter(), 0)
    try:
        for sig, n in data["counts"]:
            found.counts[tuple(tuple(int(d) for d in s) for s in sig)] += int(n)
        found.dropped = int(data.get("dropped", 0))
    except (TypeError, ValueError):
        log.debug("ignoring a malformed shapes file for %s", model_hash)
        return None
    return found


def recorded(cache: Cache, model_hash: str) -> Counter[Signature]:
    """The shapes recorded for a model (signature -> calls)."""
    found = read_traffic(cache, model_hash)
    return found.counts if found is not None else Counter()


def write_fitted(
    cache: Cache,
    model_hash: str,
    input_names: Sequence[str],
    signatures: Sequence[Signature],
    info: Mapping[str, Any],
) -> Path:
    """Store the signatures `rkort warmup --from-traffic` compiled: sessions of the model use
    them from then on (see :func:`fitted_signatures`)."""
    directory = cache.model_dir("traffic", model_hash)
    data = {
        "version": FORMAT,
        **info,
        "inputs": list(input_names),
        "signatures": [[list(s) for s in sig] for sig in signatures],
    }
    path = directory / "fitted.json"
    write_atomic(path, json.dumps(data, indent=1).encode())
    return path


def fitted_signatures(cache: Cache, model_hash: str) -> Optional[list[Signature]]:
    """The signatures `rkort warmup --from-traffic` fitted for a model, if any."""
    data: Any = read_json(traffic_dir(cache, model_hash) / "fitted.json")
    if not isinstance(data, dict) or not isinstance(data.get("signatures"), list):
        return None
    try:
        return [tuple(tuple(int(d) for d in s) for s in sig) for sig in data["signatures"]]
    except (TypeError, ValueError):
        return None
