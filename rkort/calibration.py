"""Calibration data for quantized builds: feeds kept from real traffic (``record_inputs=N``, the
source of ``calibration=recorded``), read back as feeds of the model.

    root/calibration/<model hash>/feed-<n>.npz    one feed (input name -> array), private
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .cache import Cache

log = logging.getLogger("rkort")


def recorded_dir(cache: Cache, model_hash: str) -> Path:
    return cache.root / "calibration" / model_hash


class InputRecorder:
    """Keeps the first ``limit`` feeds of a model (opt-in: they are real data), in the cache
    directory, private like the cache; never fails a session."""

    def __init__(
        self, cache: Cache, model_hash: str, input_names: Sequence[str], limit: int
    ) -> None:
        self.directory = recorded_dir(cache, model_hash)
        self.cache = cache
        self.input_names = list(input_names)
        self.limit = limit
        self._lock = threading.Lock()
        self._full = False

    def record(self, arrays: Sequence[np.ndarray]) -> None:
        if self._full:
            return
        with self._lock:
            try:
                self.cache._ensure_dirs("calibration")
                self.directory.mkdir(mode=0o700, exist_ok=True)
                for n in range(self.limit):
                    path = self.directory / f"feed-{n:05d}.npz"
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    except FileExistsError:
                        continue
                    with os.fdopen(fd, "wb") as f:
                        np.savez(f, **dict(zip(self.input_names, arrays)))
                    return
                self._full = True
            except OSError as e:
                log.debug("could not keep a calibration feed in %s: %s", self.directory, e)
                self._full = True


def recorded_feeds(cache: Cache, model_hash: str) -> list[dict[str, np.ndarray]]:
    """The feeds ``record_inputs`` kept for a model, in the order they came."""
    feeds = []
    for path in sorted(recorded_dir(cache, model_hash).glob("feed-*.npz")):
        with np.load(path, allow_pickle=False) as data:
            feeds.append({k: data[k] for k in data.files})
    return feeds
