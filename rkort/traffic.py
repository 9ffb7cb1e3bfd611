"""Recorded traffic: the input shapes a model really sees (shapes only, never data), kept per model
in the cache directory, and the buckets fitted to them (`rkort buckets`, `rkort warmup
--from-traffic`).

    root/traffic/<model hash>/shapes.json    {"inputs": [...], "counts": [[signature, n], ...]}
    root/traffic/<model hash>/fitted.json    {"inputs": [...], "signatures": [...]}
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .cache import Cache
from .files import read_json, write_atomic

log = logging.getLogger("rkort")

Signature = tuple[tuple[int, ...], ...]
#: Recorded shapes are merged into the file at most this often (calls), and at exit.
_FLUSH_EVERY = 256


def traffic_dir(cache: Cache, model_hash: str) -> Path:
    return cache.root / "traffic" / model_hash


class ShapeRecorder:
    """Counts the input shapes of one session's calls and merges them into the model's file."""

    def __init__(self, cache: Cache, model_hash: str, input_names: Sequence[str]) -> None:
        self.cache = cache
        self.model_hash = model_hash
        self.input_names = list(input_names)
        self._counts: Counter[Signature] = Counter()
        self._pending = 0
        self._lock = threading.Lock()

    def record(self, arrays: Sequence[np.ndarray]) -> None:
        signature = tuple(tuple(int(d) for d in a.shape) for a in arrays)
        with self._lock:
            self._counts[signature] += 1
            self._pending += 1
            due = self._pending >= _FLUSH_EVERY
        if due:
            self.flush()

    def flush(self) -> None:
        """Merge what was counted since the last flush into the model's shapes file."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
            self._pending = 0
        if not counts:
            return
        try:
            merge_counts(self.cache, self.model_hash, self.input_names, counts)
        except OSError as e:
            log.debug("could not record shapes in %s: %s", self.cache.root, e)


def merge_counts(
    cache: Cache, model_hash: str, input_names: Sequence[str], counts: Counter[Signature]
) -> None:
    import filelock

    directory = traffic_dir(cache, model_hash)
    cache._ensure_dirs("traffic")
    directory.mkdir(mode=0o700, exist_ok=True)
    with filelock.FileLock(str(directory / "shapes.lock")):
        total = recorded(cache, model_hash)
        for sig, n in counts.items():
            total[sig] += n
        data = {
            "inputs": list(input_names),
            "counts": [[[list(s) for s in sig], n] for sig, n in sorted(total.items())],
        }
        write_atomic(directory / "shapes.json", json.dumps(data).encode())


def recorded(cache: Cache, model_hash: str) -> Counter[Signature]:
    """The shapes recorded for a model (signature -> calls)."""
    data = read_json(traffic_dir(cache, model_hash) / "shapes.json", 64 << 20)
    found: Counter[Signature] = Counter()
    if isinstance(data, dict):
        for sig, n in data.get("counts", []):
            found[tuple(tuple(int(d) for d in s) for s in sig)] += int(n)
    return found


def fitted_signatures(cache: Cache, model_hash: str) -> Optional[list[Signature]]:
    """The signatures `rkort warmup --from-traffic` fitted for a model, if any."""
    data: Any = read_json(traffic_dir(cache, model_hash) / "fitted.json")
    if not isinstance(data, dict) or not isinstance(data.get("signatures"), list):
        return None
    return [tuple(tuple(int(d) for d in s) for s in sig) for sig in data["signatures"]]
