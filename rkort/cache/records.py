"""Program records: what was decided to run for one model, signature and build configuration
(segments, their blob keys and shapes, trial-build verdicts), kept as small JSON documents beside
the blobs so that a machine without the converter rebuilds the same program from the cache.

    root/programs/<model hash[:2]>/<model hash>/<record key>.json

Each file holds ``{"key", "format", "sha256", "body"}``; a file whose key, format or checksum of
its body does not match is ignored (and removed), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

from ..files import listdir, read_json, unlink, write_atomic
from .entry import KEY_RE, check_key

logger = logging.getLogger("rkort.cache")

RECORD_FORMAT = 1
_LIMIT = 64 << 20


class Records:
    """The program records of one cache root (see the module docstring)."""

    def __init__(
        self, root: Path, ready: Callable[[], bool], make_dir: Callable[[str], None]
    ) -> None:
        self.root = root
        self._ready = ready
        self._make_dir = make_dir

    def _dir(self, model: str) -> Path:
        check_key(model)
        return self.root / "programs" / model[:2] / model

    def get(self, model: str, key: str) -> Optional[dict[str, Any]]:
        """The record ``key`` of ``model`` (a content hash), or None."""
        check_key(key)
        if not self._ready():
            return None
        path = self._dir(model) / f"{key}.json"
        body = _body(read_json(path, _LIMIT), key)
        if body is None and os.path.lexists(path):
            logger.warning("program record %s in %s is damaged; removed", key, self.root)
            unlink(path)
        return body

    def put(self, model: str, key: str, body: Mapping[str, Any]) -> bool:
        """Store a record (atomically); False (and a debug log) when the cache cannot be written."""
        check_key(key)
        data = {"key": key, "format": RECORD_FORMAT, "sha256": _digest(body), "body": dict(body)}
        try:
            self._make_dir("programs")
            directory = self._dir(model)
            for level in (directory.parent, directory):  # each private, whatever the umask
                level.mkdir(mode=0o700, exist_ok=True)
            write_atomic(directory / f"{key}.json", json.dumps(data, allow_nan=False).encode())
        except OSError as exc:
            logger.debug("could not store program record %s in %s: %s", key, self.root, exc)
            return False
        return True

    def all(self, model: str) -> list[dict[str, Any]]:
        """Every valid record of ``model``."""
        if not self._ready():
            return []
        directory = self._dir(model)
        found = []
        for name in listdir(directory):
            key = name[: -len(".json")]
            if name.endswith(".json") and KEY_RE.fullmatch(key):
                body = _body(read_json(directory / name, _LIMIT), key)
                if body is not None:
                    found.append(body)
        return found

    def models(self) -> list[str]:
        """The content hashes of every model that has records."""
        base = self.root / "programs"
        return [
            name
            for shard in listdir(base)
            for name in listdir(base / shard)
            if KEY_RE.fullmatch(name) and name[:2] == shard
        ]


def _digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(dict(body), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _body(data: Any, key: str) -> Optional[dict[str, Any]]:
    if not isinstance(data, dict) or data.get("key") != key or data.get("format") != RECORD_FORMAT:
        return None
    body = data.get("body")
    if not isinstance(body, dict) or data.get("sha256") != _digest(body):
        return None
    return body
