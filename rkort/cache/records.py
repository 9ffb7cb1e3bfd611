"""Program records: what was decided to run for one model, signature and build configuration
(segments, their blob keys and shapes, trial-build verdicts), kept as small JSON documents beside
the blobs so that a machine without the converter rebuilds the same program from the cache.

    root/programs/<model hash[:2]>/<model hash>/<record key>.json

Each file holds ``{"key", "format", "sha256", "body"}``; a file whose key, format or checksum of
its body does not match is ignored (and removed), never trusted. With a remote cache (see
:mod:`rkort.cache.remote`), a record missing here is fetched from it and one stored is published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from ..files import listdir, read_json, unlink, write_atomic
from .entry import KEY_RE, Entry, check_key

logger = logging.getLogger("rkort.cache")

RECORD_FORMAT = 1
_LIMIT = 64 << 20


class RemoteCache(Protocol):
    """What a :class:`~rkort.cache.Cache` and its records ask of a remote cache (implemented by
    :class:`rkort.cache.remote.Remote`). None of these raises: a failing remote is a miss."""

    def fetch(self, key: str, expect: Mapping[str, Any]) -> Optional[Entry]:
        """The entry ``key`` fetched into the local cache and verified, or None."""

    def publish(self, entry: Entry) -> None:
        """Upload an entry just built here (when publishing is on)."""

    def fetch_record(self, model: str, key: str) -> Optional[dict[str, Any]]:
        """The body of a record fetched into the local cache and verified, or None."""

    def publish_record(self, model: str, key: str, data: bytes) -> None:
        """Upload a record just stored here (when publishing is on)."""

    def sync_records(self, model: str) -> None:
        """Fetch the remote's records of ``model`` that are missing here (once per process)."""


class Records:
    """The program records of one cache root (see the module docstring)."""

    def __init__(
        self, root: Path, ready: Callable[[], bool], make_dir: Callable[[str], None]
    ) -> None:
        self.root = root
        self._ready = ready
        self._make_dir = make_dir
        #: The remote cache consulted on a miss and published to (set by the Cache).
        self.remote: Optional[RemoteCache] = None

    def _dir(self, model: str) -> Path:
        check_key(model)
        return self.root / "programs" / model[:2] / model

    def path(self, model: str, key: str) -> Path:
        """Where the record ``key`` of ``model`` is kept."""
        check_key(key)
        return self._dir(model) / f"{key}.json"

    def get(self, model: str, key: str) -> Optional[dict[str, Any]]:
        """The record ``key`` of ``model`` (a content hash), or None; on a miss, the remote's."""
        body = self.local(model, key)
        if body is None and self.remote is not None:
            body = self.remote.fetch_record(model, key)
        return body

    def local(self, model: str, key: str) -> Optional[dict[str, Any]]:
        """The record ``key`` of ``model`` in this cache, or None (a damaged one is removed)."""
        path = self.path(model, key)
        if not self._ready():
            return None
        body = parse(read_json(path, _LIMIT), key)
        if body is None and os.path.lexists(path):
            logger.warning("program record %s in %s is damaged; removed", key, self.root)
            unlink(path)
        return body

    def put(self, model: str, key: str, body: Mapping[str, Any]) -> bool:
        """Store a record (atomically); False (and a debug log) when the cache cannot be written.
        Published to the remote cache when the cache publishes."""
        check_key(key)
        data = {"key": key, "format": RECORD_FORMAT, "sha256": _digest(body), "body": dict(body)}
        encoded = json.dumps(data, allow_nan=False).encode()
        try:
            write_atomic(self.make_dir(model) / f"{key}.json", encoded)
        except OSError as exc:
            logger.debug("could not store program record %s in %s: %s", key, self.root, exc)
            return False
        if self.remote is not None:
            self.remote.publish_record(model, key, encoded)
        return True

    def make_dir(self, model: str) -> Path:
        """The directory of ``model``'s records, created private (0700) whatever the umask."""
        self._make_dir("programs")
        directory = self._dir(model)
        for level in (directory.parent, directory):
            level.mkdir(mode=0o700, exist_ok=True)
        return directory

    def all(self, model: str) -> list[dict[str, Any]]:
        """Every valid record of ``model`` (the remote's fetched first, once per process)."""
        if self.remote is not None:
            self.remote.sync_records(model)
        return [body for _, body in self.local_all(model)]

    def local_all(self, model: str) -> list[tuple[str, dict[str, Any]]]:
        """Every valid record of ``model`` in this cache, as (record key, body)."""
        if not self._ready():
            return []
        directory = self._dir(model)
        found = []
        for name in listdir(directory):
            key = name[: -len(".json")]
            if name.endswith(".json") and KEY_RE.fullmatch(key):
                body = parse(read_json(directory / name, _LIMIT), key)
                if body is not None:
                    found.append((key, body))
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


def parse(data: Any, key: str) -> Optional[dict[str, Any]]:
    """The body of a record file's parsed JSON if it is record ``key``, of this format, with a
    matching checksum; else None."""
    if not isinstance(data, dict) or data.get("key") != key or data.get("format") != RECORD_FORMAT:
        return None
    body = data.get("body")
    if not isinstance(body, dict) or data.get("sha256") != _digest(body):
        return None
    return body
