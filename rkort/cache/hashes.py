"""Content hashes of model files, memoized by file identity so an unchanged model is never re-read.

A memo is keyed by the file's real path and holds its stat stamp (size, mtime, inode, ctime,
device); a file whose stamp changed is hashed again. Files changed within the filesystem's
timestamp granularity are not memoized (git's and ccache's "racily clean" rule).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from .. import files
from .entry import KEY_RE

logger = logging.getLogger("rkort.cache")

# Filesystems with coarse timestamps (1-2 s on ext3, FAT, some NFS) can rewrite a file without
# changing any stat field if it happens within one tick of the hash; a file that new is not
# memoized, the same "racily clean" rule git and ccache follow.
_RACY_WINDOW_S = 2.0

#: Digests this process read from (or wrote to) the memos, by (cache root, real path): the stamp
#: they hold for and the digest. An unchanged stamp answers without reading the memo again.
_SEEN: dict[tuple[str, str], tuple[list[Any], str]] = {}


def _stamp(real: str, st: os.stat_result) -> list[Any]:
    return [real, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev]


class HashMemo:
    """Memoized sha256 digests of files, kept under ``root/hashes`` (written only when
    ``ready()`` says the cache root may be used)."""

    def __init__(self, root: Path, ready: Callable[[], bool], make_dir: Callable[[], None]) -> None:
        self.root = root
        self._ready = ready
        self._make_dir = make_dir

    def content_hash(self, path: files.StrPath, extra_files: Sequence[files.StrPath] = ()) -> str:
        """The sha256 of a model file's bytes, memoized by the file's stat.

        With ``extra_files`` (e.g. ONNX external-data files) the result is the sha256 of every
        file's sha256, in the order given. A file whose path, size, mtime, ctime, inode or device
        changed is hashed again; an unchanged one is not read.
        """
        digests = [self.file_digest(p) for p in (path, *extra_files)]
        if not extra_files:
            return digests[0]
        combined = hashlib.sha256(b"rkort-files\0")
        for digest in digests:
            combined.update(bytes.fromhex(digest))
        return combined.hexdigest()

    def model_hash(
        self, path: files.StrPath, find_extra: Callable[[], Sequence[files.StrPath]]
    ) -> str:
        """:meth:`content_hash` of a model file and the files ``find_extra()`` names (its
        external data), with that list memoized by the model file's stat too: an unchanged
        model is neither read nor parsed again."""
        given = (str(self.root), os.fspath(path))
        known_model = _MODELS.get(given)
        if known_model is not None and all(_quick(f) == q for f, q in known_model[0]):
            return known_model[1]  # the same files as last time: no realpath, no memo read
        real = os.path.realpath(os.fspath(path))
        memo_path = self.root / "hashes" / f"{_name(real)}.extra.json"
        stamp = _stamp(real, os.stat(real))
        memo = files.read_json(memo_path) if self._ready() else None
        if (
            isinstance(memo, dict)
            and memo.get("stamp") == stamp
            and isinstance(memo.get("files"), list)
        ):
            extra = [str(f) for f in memo["files"]]
        else:
            extra = [os.fspath(f) for f in find_extra()]
            try:
                self._make_dir()
                files.write_atomic(memo_path, json.dumps({"stamp": stamp, "files": extra}).encode())
            except OSError as exc:
                logger.debug("could not memoize the data files of %s: %s", real, exc)
        before = [(f, _quick(f)) for f in (os.fspath(path), *extra)]
        digest = self.content_hash(real, extra)
        if all(self._trusted(f) for f, _ in before):
            # Remembered only when the memo trusts every file (none racily new).
            _MODELS[given] = (before, digest)
        return digest

    def _trusted(self, path: str) -> bool:
        real = os.path.realpath(path)
        known = _SEEN.get((str(self.root), real))
        return known is not None and known[0] == _stamp(real, os.stat(real))

    def file_digest(self, path: files.StrPath) -> str:
        real = os.path.realpath(os.fspath(path))
        stamp = _stamp(real, os.stat(real))
        seen = (str(self.root), real)
        known = _SEEN.get(seen)
        if known is not None and known[0] == stamp:
            return known[1]
        memo_path = self.root / "hashes" / f"{_name(real)}.json"
        if self._ready():
            memo = files.read_json(memo_path)
            if isinstance(memo, dict) and memo.get("stamp") == stamp:
                digest = memo.get("sha256")
                if isinstance(digest, str) and KEY_RE.fullmatch(digest):
                    _SEEN[seen] = (stamp, digest)
                    return digest
        started = time.time()
        digest, before, after = files.sha256_file(real)
        if before != after or _stamp(real, after) != stamp:
            return digest  # changed while we read it: correct for this call, not worth keeping
        newest = max(after.st_mtime_ns, after.st_ctime_ns) / 1e9
        if started - newest < _RACY_WINDOW_S:
            return digest
        try:
            self._make_dir()
            files.write_atomic(memo_path, json.dumps({"stamp": stamp, "sha256": digest}).encode())
        except OSError as exc:
            logger.debug("could not memoize the hash of %s in %s: %s", real, self.root, exc)
        else:
            _SEEN[seen] = (stamp, digest)
        return digest


#: Model hashes this process computed, by (cache root, the path as given): the files' quick
#: stamps (the model's and its data files', symlinks followed) and the hash.
_MODELS: dict[tuple[str, str], tuple[list[tuple[str, tuple[int, ...]]], str]] = {}


def _quick(path: str) -> tuple[int, ...]:
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev)


def _name(real: str) -> str:
    return hashlib.sha256(os.fsencode(real)).hexdigest()


def bytes_hash(data: bytes) -> str:
    """The sha256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


__all__ = ["HashMemo", "bytes_hash"]
