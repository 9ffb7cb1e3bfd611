"""The compiled-blob cache: RKNN blobs stored on disk under a key, checked before they are used.

A blob is compiled once per key (a hash of everything that changes it, see :func:`make_key`) and
then found by every later session, in any process. One :class:`Cache` is one directory::

    root/
      v1/ab/<key>/model.rknn    the blob
                  meta.json     what built it, plus sha256, size, created, format, key
                  last_used     empty; its mtime is the last use
      tmp/<key>.<random>/       builds in progress; renamed into v1/ when complete
      locks/<key>.lock          per-key inter-process locks (filelock)
      hashes/<sha256 of path>.json  memoized content hashes of model files, keyed by stat
      quarantine/               entries refused as unsafe, moved aside and never read
      programs/, traffic/, branches/  per-model records, recorded shapes, branch models

Entries appear only by an atomic rename of a complete, fsynced directory, and every blob is checked
against its recorded sha256 and size before :meth:`Cache.get` returns it. Nothing in the cache is
ever unpickled or executed: metadata is JSON.

When the directory cannot take a blob (read-only, full, not a directory), builds still succeed:
the blob goes to a private temporary directory (an *ephemeral* entry) with one warning. A remote
cache (:mod:`rkort.cache.remote`) is asked on a local miss and, when publishing, given new builds.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import filelock

from ..files import (
    O_NOFOLLOW,
    O_NONBLOCK,
    BlobNotWritten,
    StrPath,
    fsync_dir,
    listdir,
    private_dir,
    remove_tree,
    write_new,
)
from .entry import (
    BLOB,
    FORMAT_VERSION,
    IDENTITY_FIELDS,
    KEY_RE,
    LAST_USED,
    META,
    Entry,
    Problem,
    adopt_ephemeral,
    canonical,
    check_built,
    check_key,
    checked_meta,
    clean_tmp,
    default_cache_dir,
    dump_meta,
    ephemeral_entry,
    inspect_entry,
    prune_order,
    root_usable,
    seal_blob,
)
from .hashes import HashMemo, bytes_hash
from .records import Records, RemoteCache

logger = logging.getLogger("rkort.cache")

# A build in progress holds its key's lock, so the lock is what protects it; the age only keeps
# a concurrent older rkort, which may lock differently, from losing its temp dir.
_STALE_TMP_AGE_S = 300.0

#: Opens the remote cache a Cache names: rkort.cache.remote's (a room above), set by rkort.cache.
open_remote: Optional[Callable[[Cache], RemoteCache]] = None


class Cache:
    """A directory of compiled blobs, shared safely between threads and processes.

    Nothing is created until the first write. If ``root`` exists but is owned by another user
    or writable by group or others, :class:`CacheError` is raised.
    """

    def __init__(
        self,
        root: Optional[StrPath] = None,
        *,
        remote: Optional[str] = None,
        remote_write: bool = False,
    ) -> None:
        self.root: Path = Path(
            os.path.abspath(os.path.expanduser(os.fspath(root)))
            if root is not None
            else os.path.abspath(default_cache_dir())
        )
        #: A shared remote cache (an fsspec URL) read on a local miss; written when asked.
        self.remote_url = remote or os.environ.get("RKORT_REMOTE_CACHE") or None
        env_write = os.environ.get("RKORT_REMOTE_WRITE", "").strip().lower()
        self.remote_write = remote_write or env_write in ("1", "true", "yes", "on")
        self._locks: dict[tuple[int, str], filelock.FileLock] = {}
        #: Memoized content hashes of model files (:mod:`rkort.cache.hashes`).
        self.hashes = HashMemo(self.root, self._root_exists, lambda: self._ensure_dirs("hashes"))
        #: The program records kept beside the blobs (:mod:`rkort.cache.records`).
        self.records = Records(self.root, self._root_exists, self._ensure_dirs)
        self._root_exists()
        self.remote = open_remote(self) if self.remote_url and open_remote else None
        self.records.remote = self.remote

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    # -- content hashes ------------------------------------------------------------------------

    def content_hash(self, path: StrPath, extra_files: Sequence[StrPath] = ()) -> str:
        """The sha256 of a model file (and its external-data files), memoized by file identity;
        see :class:`rkort.cache.hashes.HashMemo`."""
        return self.hashes.content_hash(path, extra_files)

    def model_hash(self, path: StrPath, find_extra: Callable[[], Sequence[StrPath]]) -> str:
        """The content hash of a model file and its external data files, the list of which
        ``find_extra()`` gives when the memo cannot (see :meth:`HashMemo.model_hash`)."""
        return self.hashes.model_hash(path, find_extra)

    bytes_hash = staticmethod(bytes_hash)

    # -- reading -------------------------------------------------------------------------------

    def get(
        self, key: str, expect: Optional[Mapping[str, Any]] = None, *, remote: bool = True
    ) -> Optional[Entry]:
        """The entry for ``key`` after checking its blob's sha256 and size, or None.

        A corrupt entry is removed and an unsafe one (symlink, foreign owner, outside the root)
        moved to ``quarantine/``, each with a warning; both count as absent. With ``expect``, an
        entry whose metadata differs from it on any of its fields counts as corrupt too. On a
        local miss, the remote cache's entry is fetched here and checked alike (with ``remote``).
        """
        check_key(key)
        expected = canonical(expect or {})
        entry, problem = None, None
        if self._root_exists():
            entry, problem = inspect_entry(
                self.root, self._entry_dir(key), key, verify=True, expect=expected
            )
        if problem is not None:
            entry = self._repair(key, problem, expected)
        if entry is None:
            return self.remote.fetch(key, expected) if remote and self.remote else None
        return self._touch(entry)

    def entries(self) -> list[Entry]:
        """Every entry that looks valid, without reading blobs (so checksums are not checked)."""
        found = []
        for key in self._keys():
            entry, _ = inspect_entry(self.root, self._entry_dir(key), key, verify=False)
            if entry is not None:
                found.append(entry)
        return found

    def info(self) -> dict:
        """``{"root": str, "entries": int, "bytes": int}`` for the valid-looking entries."""
        listed = self.entries()
        return {
            "root": str(self.root),
            "entries": len(listed),
            "bytes": sum(e.size for e in listed),
        }

    # -- writing -------------------------------------------------------------------------------

    def get_or_build(
        self,
        key: str,
        build: Callable[[Path], Optional[Mapping[str, Any]]],
        meta: Mapping[str, Any],
    ) -> tuple[Entry, bool]:
        """The entry for ``key``, built by ``build`` if absent; True when this call built it.

        ``build(blob_path)`` writes the blob at ``blob_path`` and may return extra metadata. It
        runs at most once per key across processes sharing the cache. If it raises, nothing is
        left behind and the exception propagates unchanged. If the cache directory cannot be
        written, the blob is built in a private temporary directory and returned as an
        ephemeral entry, with one warning per cache root and process; so is a blob whose build
        raised :class:`BlobNotWritten`.

        An existing entry whose metadata disagrees with ``meta`` on an :data:`IDENTITY_FIELDS`
        field is removed with a warning and built again.
        """
        check_key(key)
        base_meta = checked_meta(meta, "meta")
        expect = {f: base_meta[f] for f in IDENTITY_FIELDS if f in base_meta}
        entry = self.get(key, expect)
        if entry is not None:
            return entry, False
        try:
            self._ensure_dirs("v1", "tmp", "locks")
            lock = self._lock(key)
            _acquire(lock, key)
        except OSError as exc:
            return self._build_ephemeral(key, build, base_meta, exc), True
        try:
            entry = self.get(key, expect, remote=False)
            if entry is not None:
                return entry, False
            # Holding the key's lock proves no build of this key is running: whatever it left
            # in tmp/ is from a killed one, however young.
            clean_tmp(self.root, self._lock, _STALE_TMP_AGE_S, holding=key)
            try:
                tmp_dir = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.root / "tmp"))
            except OSError as exc:
                return self._build_ephemeral(key, build, base_meta, exc), True
            try:
                entry = self._build_into(tmp_dir, key, build, base_meta)
            finally:
                remove_tree(tmp_dir)
        finally:
            lock.release()
        if self.remote is not None:
            self.remote.publish(entry)
        return entry, True

    def _build_into(
        self,
        tmp_dir: Path,
        key: str,
        build: Callable[[Path], Optional[Mapping[str, Any]]],
        base_meta: dict[str, Any],
    ) -> Entry:
        blob = tmp_dir / BLOB
        try:
            extra = build(blob)
        except BlobNotWritten as exc:
            self._warn_unusable(exc)
            return adopt_ephemeral(key, base_meta, exc.blob)
        full_meta = {**base_meta, **checked_meta(extra or {}, "the metadata build returned")}
        check_built(blob)
        try:
            return self._commit(tmp_dir, key, full_meta)
        except OSError as exc:
            # The blob is built; keep it rather than compile again, but not in the root.
            def copy(dst: Path) -> None:
                shutil.copyfile(blob, dst)

            try:
                rescued = ephemeral_entry(key, full_meta, copy)
            except OSError:
                raise exc from None
            self._warn_unusable(exc)
            return rescued

    def _commit(self, tmp_dir: Path, key: str, full_meta: dict[str, Any]) -> Entry:
        digest, size = seal_blob(tmp_dir / BLOB)
        created = time.time()
        full_meta.update(key=key, format=FORMAT_VERSION, sha256=digest, size=size, created=created)
        write_new(tmp_dir / META, dump_meta(full_meta))
        write_new(tmp_dir / LAST_USED, b"")
        fsync_dir(tmp_dir)
        entry_dir = self.place(tmp_dir, key)
        return Entry(key, entry_dir, entry_dir / BLOB, full_meta, size, created, created)

    def place(self, tmp_dir: Path, key: str) -> Path:
        """Rename a complete, checked entry directory under ``tmp/`` into place as ``key``'s (the
        caller holds the key's lock); returns where it is now."""
        entry_dir = self._entry_dir(key)
        shard = entry_dir.parent
        if os.path.islink(shard):
            # Never write an entry through a link: it would land outside the cache.
            self._ensure_dirs("quarantine")
            os.rename(shard, self.root / "quarantine" / f"{shard.name}.{time.time_ns()}")
            logger.warning(
                "cache directory %s is a symlink; moved to quarantine, replaced by a real one",
                shard,
            )
        os.makedirs(shard, mode=0o700, exist_ok=True)
        os.rename(tmp_dir, entry_dir)
        try:
            fsync_dir(entry_dir.parent)
        except OSError as exc:
            # The entry is already in place and get() checks it before any use.
            logger.debug("could not fsync %s: %s", entry_dir.parent, exc)
        return entry_dir

    def _build_ephemeral(
        self,
        key: str,
        build: Callable[[Path], Optional[Mapping[str, Any]]],
        base_meta: dict[str, Any],
        cause: OSError,
    ) -> Entry:
        self._warn_unusable(cause)

        def run(blob: Path) -> Optional[Mapping[str, Any]]:
            extra = build(blob)
            check_built(blob)
            return extra

        try:
            return ephemeral_entry(key, base_meta, run)
        except BlobNotWritten as exc:
            return adopt_ephemeral(key, base_meta, exc.blob)

    def _warn_unusable(self, cause: OSError) -> None:
        # setdefault is atomic: one warning even when threads fail at once, and no lock to hold.
        token = object()
        if _warned_roots.setdefault(str(self.root), token) is not token:
            return
        logger.warning(
            "cannot use the cache directory %s (%s); compiled models go to temporary "
            "directories and will be compiled again next time. Set RKORT_CACHE_DIR to a "
            "writable directory to keep them.",
            self.root,
            cause,
        )

    def remove(self, key: str) -> bool:
        """Remove the entry for ``key`` (a symlink is unlinked, not followed); True if there was."""
        check_key(key)
        if not self._root_exists():
            return False
        with self._lock(key):
            return self._discard(key, quarantine=False)

    def clear(self) -> int:
        """Remove every entry (and the program records, the branch models and the quarantine);
        returns the number of entries removed. Recorded traffic is the user's: it stays."""
        if not self._root_exists():
            return 0
        removed = sum(self.remove(key) for key in self._keys())
        for sub in ("quarantine", "programs", "branches"):
            folder = self.root / sub
            if folder.is_dir() and not folder.is_symlink():
                for item in folder.iterdir():
                    remove_tree(item)
        clean_tmp(self.root, self._lock, 0.0)
        return removed

    def prune(
        self, max_bytes: Optional[int] = None, max_age: Optional[float] = None
    ) -> list[Entry]:
        """Remove entries unused for more than ``max_age`` seconds, then the least recently used
        until the total size is at most ``max_bytes``. Returns the removed entries.
        """
        order = prune_order(self.entries(), max_bytes, max_age, time.time())
        return [entry for entry in order if self.remove(entry.key)]

    # -- internals -----------------------------------------------------------------------------

    def _root_exists(self) -> bool:
        """Whether the root exists as a directory; raises CacheError if it is not safe to use."""
        return root_usable(self.root)

    def model_dir(self, kind: str, model_hash: str) -> Path:
        """A directory private to this user (0700) for one model's files of one ``kind``
        (``traffic``, ``branches``): made if missing; refused if a link or another user's."""
        if not model_hash.isalnum():  # one plain path component, never a way out of the root
            raise ValueError(f"not a model hash: {model_hash!r}")
        self._ensure_dirs(kind)
        return private_dir(self.root / kind / model_hash)

    def _ensure_dirs(self, *subdirs: str) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if not self._root_exists():  # e.g. a file in its place
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self.root))
        for sub in subdirs:
            path = self.root / sub
            if os.path.islink(path):
                raise OSError(errno.ELOOP, "a symlink in place of a cache directory", str(path))
            os.makedirs(path, mode=0o700, exist_ok=True)

    def _layout(self) -> Path:
        return self.root / f"v{FORMAT_VERSION}"

    def _entry_dir(self, key: str) -> Path:
        return self._layout() / key[:2] / key

    def _lock(self, key: str) -> filelock.FileLock:
        # One lock object per key, Cache and process: filelock is reentrant per object and
        # thread, which lets get() repair an entry while get_or_build holds the same key; a lock
        # object inherited across fork() refuses to work, so a forked child makes its own.
        # setdefault is atomic, and no threading lock is needed that a fork could leave held.
        slot = (os.getpid(), key)
        lock = self._locks.get(slot)
        if lock is None:
            path = str(self.root / "locks" / f"{key}.lock")
            lock = self._locks.setdefault(slot, filelock.FileLock(path))
        return lock

    def _keys(self) -> Iterator[str]:
        if not self._root_exists():
            return
        for shard in listdir(self._layout()):
            shard_dir = self._layout() / shard
            if len(shard) != 2 or shard_dir.is_symlink():
                continue
            for name in listdir(shard_dir):
                if KEY_RE.fullmatch(name) and name[:2] == shard:
                    yield name

    def _repair(
        self, key: str, problem: Problem, expect: Optional[Mapping[str, Any]] = None
    ) -> Optional[Entry]:
        """Under the key's lock, look again: set a still-bad entry aside, or return a good one."""
        try:
            lock = self._lock(key)
            _acquire(lock, key)
        except OSError as exc:
            logger.warning(
                "cache entry %s in %s is refused: %s (could not remove it: %s)",
                key,
                self.root,
                problem.reason,
                exc,
            )
            return None
        try:
            entry, again = inspect_entry(
                self.root, self._entry_dir(key), key, verify=True, expect=expect
            )
            if again is None:
                return entry  # another process replaced it meanwhile
            action = "moved to quarantine" if again.unsafe else "removed; it will be rebuilt"
            logger.warning("cache entry %s in %s: %s; %s", key, self.root, again.reason, action)
            try:
                self._discard(key, quarantine=again.unsafe)
            except OSError as exc:
                logger.warning("could not set aside cache entry %s: %s", key, exc)
            return None
        finally:
            lock.release()

    def _discard(self, key: str, quarantine: bool) -> bool:
        """Move the entry path out of the way by one rename (never following a symlink)."""
        entry_dir = self._entry_dir(key)
        if not os.path.lexists(entry_dir):
            return False
        if quarantine:
            self._ensure_dirs("quarantine")
            os.rename(entry_dir, self.root / "quarantine" / f"{key}.{time.time_ns()}")
            return True
        # One rename makes the entry vanish whole; deleting the files can then take its time.
        self._ensure_dirs("tmp")
        trash = self.root / "tmp" / f"{key}.removed-{time.time_ns()}-{os.getpid()}"
        os.rename(entry_dir, trash)
        remove_tree(trash)
        return True

    def _touch(self, entry: Entry) -> Entry:
        flags = os.O_WRONLY | os.O_CREAT | O_NOFOLLOW | O_NONBLOCK
        try:
            fd = os.open(entry.dir / LAST_USED, flags, 0o600)
            try:
                os.utime(fd if os.utime in os.supports_fd else entry.dir / LAST_USED)
            finally:
                os.close(fd)
        except OSError as exc:
            logger.debug("could not record the use of %s: %s", entry.key, exc)
            return entry
        return dataclasses.replace(entry, last_used=time.time())


# -- module helpers -----------------------------------------------------------------------------


_warned_roots: dict[str, object] = {}


def _acquire(lock: filelock.FileLock, key: str) -> None:
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        logger.info("waiting for another process to finish building cache entry %s", key)
        lock.acquire()
