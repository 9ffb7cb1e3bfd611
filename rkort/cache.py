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

Entries appear only by an atomic rename of a complete, fsynced directory, and every blob is checked
against its recorded sha256 and size before :meth:`Cache.get` returns it. Nothing in the cache is
ever unpickled or executed: metadata is JSON.

When the directory cannot take a blob (read-only, full, not a directory), builds still succeed:
the blob goes to a private temporary directory (an *ephemeral* entry) with one warning.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import filelock
import platformdirs

__all__ = [
    "FORMAT_VERSION",
    "IDENTITY_FIELDS",
    "BlobNotWritten",
    "Cache",
    "CacheError",
    "Entry",
    "default_cache_dir",
    "make_key",
]

#: Version of the on-disk layout and metadata; part of every key, so a bump orphans old entries.
FORMAT_VERSION: int = 1

StrPath = Union[str, "os.PathLike[str]"]

logger = logging.getLogger("rkort.cache")

_BLOB = "model.rknn"
_META = "meta.json"
_LAST_USED = "last_used"
_RESERVED_META = frozenset({"key", "format", "sha256", "size", "created"})
#: Metadata fields that say what a blob is for. The key is derived from the same facts, so an
#: entry whose stored value differs from the one the caller passes to get_or_build was not written
#: by this build under this key (copied from elsewhere, edited, or written by another tool): it is
#: removed and rebuilt rather than loaded.
IDENTITY_FIELDS = ("toolkit", "target", "dtype", "inputs")
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
_MAX_META_BYTES = 1 << 20
# A build in progress holds its key's lock, so the lock is what protects it; the age only keeps
# a concurrent older rkort, which may lock differently, from losing its temp dir.
_STALE_TMP_AGE_S = 300.0
# Filesystems with coarse timestamps (1-2 s on ext3, FAT, some NFS) can rewrite a file without
# changing any stat field if it happens within one tick of the hash; a file that new is not
# memoized, the same "racily clean" rule git and ccache follow.
_RACY_WINDOW_S = 2.0
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

_warned_roots: dict[str, object] = {}


class CacheError(Exception):
    """The cache cannot be used safely: an unsafe root, or a build that broke its contract."""


class BlobNotWritten(OSError):
    """Raised by a build that made its blob but could not write it where the cache asked.

    The disk under the cache is full or read-only, say. ``blob`` is where the finished blob is
    instead: a file alone in a private directory, which the cache then owns. The cache keeps it
    as an ephemeral entry instead of building again.
    """

    def __init__(
        self, errno_: Optional[int], strerror: str, blob: StrPath, dest: Optional[StrPath] = None
    ) -> None:
        if dest is None:
            super().__init__(errno_, strerror)
        else:
            super().__init__(errno_, strerror, os.fspath(dest))
        self.blob = Path(blob)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One compiled blob and its metadata.

    ``ephemeral`` entries live in a private temporary directory because the cache directory was
    unusable; the caller may delete ``dir`` when it is done with the blob.
    """

    key: str
    dir: Path
    blob_path: Path
    meta: dict
    size: int
    created: float
    last_used: float
    ephemeral: bool = False


def default_cache_dir() -> Path:
    """``$RKORT_CACHE_DIR`` if set, else the user's cache directory for rkort."""
    env = os.environ.get("RKORT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    # appauthor=False: on Windows the default would nest rkort/rkort.
    return Path(platformdirs.user_cache_dir("rkort", appauthor=False))


def make_key(parts: Mapping[str, Any]) -> str:
    """The cache key for ``parts``: sha256 hex of their canonical JSON plus the format version.

    ``parts`` must be JSON-serializable; dict order does not matter, every value does.
    """
    if "format" in parts:
        raise ValueError("'format' is reserved in cache key parts (it is FORMAT_VERSION)")
    canonical = json.dumps(
        {**parts, "format": FORMAT_VERSION},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class _Problem(NamedTuple):
    unsafe: bool  # True: refused for security and quarantined; False: corrupt and deleted
    reason: str


class Cache:
    """A directory of compiled blobs, shared safely between threads and processes.

    Nothing is created until the first write. If ``root`` exists but is owned by another user
    or writable by group or others, :class:`CacheError` is raised.
    """

    def __init__(self, root: Optional[StrPath] = None) -> None:
        self.root: Path = Path(
            os.path.abspath(os.path.expanduser(os.fspath(root)))
            if root is not None
            else os.path.abspath(default_cache_dir())
        )
        self._locks: dict[tuple[int, str], filelock.FileLock] = {}
        self._root_exists()

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    # -- content hashes ------------------------------------------------------------------------

    def content_hash(self, path: StrPath, extra_files: Sequence[StrPath] = ()) -> str:
        """The sha256 of a model file's bytes, memoized by the file's stat.

        With ``extra_files`` (e.g. ONNX external-data files) the result is the sha256 of every
        file's sha256, in the order given. A file whose path, size, mtime, ctime, inode or device
        changed is hashed again; an unchanged one is not read.
        """
        digests = [self._file_digest(p) for p in (path, *extra_files)]
        if not extra_files:
            return digests[0]
        combined = hashlib.sha256(b"rkort-files\0")
        for digest in digests:
            combined.update(bytes.fromhex(digest))
        return combined.hexdigest()

    @staticmethod
    def bytes_hash(data: bytes) -> str:
        """The sha256 hex digest of ``data``."""
        return hashlib.sha256(data).hexdigest()

    def _file_digest(self, path: StrPath) -> str:
        real = os.path.realpath(os.fspath(path))
        memo_path = self.root / "hashes" / f"{hashlib.sha256(os.fsencode(real)).hexdigest()}.json"
        stamp = _stamp(real, os.stat(real))
        if self._root_exists():
            memo = _read_json(memo_path)
            if isinstance(memo, dict) and memo.get("stamp") == stamp:
                digest = memo.get("sha256")
                if isinstance(digest, str) and _KEY_RE.fullmatch(digest):
                    return digest
        started = time.time()
        digest, before, after = _sha256_file(real)
        if before != after or _stamp(real, after) != stamp:
            return digest  # changed while we read it: correct for this call, not worth keeping
        newest = max(after.st_mtime_ns, after.st_ctime_ns) / 1e9
        if started - newest < _RACY_WINDOW_S:
            return digest
        try:
            self._ensure_dirs("hashes")
            _write_atomic(memo_path, json.dumps({"stamp": stamp, "sha256": digest}).encode())
        except OSError as exc:
            logger.debug("could not memoize the hash of %s in %s: %s", real, self.root, exc)
        return digest

    # -- reading -------------------------------------------------------------------------------

    def get(self, key: str, expect: Optional[Mapping[str, Any]] = None) -> Optional[Entry]:
        """The entry for ``key`` after checking its blob's sha256 and size, or None.

        A corrupt entry is removed and an unsafe one (symlink, foreign owner, outside the root)
        moved to ``quarantine/``, each with a warning; both count as absent. With ``expect``, an
        entry whose metadata differs from it on any of its fields counts as corrupt too.
        """
        _check_key(key)
        expected = _canonical(expect or {})
        if not self._root_exists():
            return None
        entry, problem = self._inspect(key, verify=True, expect=expected)
        if problem is not None:
            entry = self._repair(key, problem, expected)
        if entry is None:
            return None
        return self._touch(entry)

    def entries(self) -> list[Entry]:
        """Every entry that looks valid, without reading blobs (so checksums are not checked)."""
        found = []
        for key in self._keys():
            entry, _ = self._inspect(key, verify=False)
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
        _check_key(key)
        base_meta = _checked_meta(meta, "meta")
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
            entry = self.get(key, expect)
            if entry is not None:
                return entry, False
            # Holding the key's lock proves no build of this key is running: whatever it left
            # in tmp/ is from a killed one, however young.
            self._clean_tmp(_STALE_TMP_AGE_S, holding=key)
            try:
                tmp_dir = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.root / "tmp"))
            except OSError as exc:
                return self._build_ephemeral(key, build, base_meta, exc), True
            try:
                return self._build_into(tmp_dir, key, build, base_meta), True
            finally:
                _remove_tree(tmp_dir)
        finally:
            lock.release()

    def _build_into(
        self,
        tmp_dir: Path,
        key: str,
        build: Callable[[Path], Optional[Mapping[str, Any]]],
        base_meta: dict[str, Any],
    ) -> Entry:
        blob = tmp_dir / _BLOB
        try:
            extra = build(blob)
        except BlobNotWritten as exc:
            self._warn_unusable(exc)
            return _adopt_ephemeral(key, base_meta, exc.blob)
        full_meta = {**base_meta, **_checked_meta(extra or {}, "the metadata build returned")}
        _check_built(blob)
        try:
            return self._commit(tmp_dir, key, full_meta)
        except OSError as exc:
            # The blob is built; keep it rather than compile again, but not in the root.
            def copy(dst: Path) -> None:
                shutil.copyfile(blob, dst)

            try:
                rescued = _ephemeral_entry(key, full_meta, copy)
            except OSError:
                raise exc from None
            self._warn_unusable(exc)
            return rescued

    def _commit(self, tmp_dir: Path, key: str, full_meta: dict[str, Any]) -> Entry:
        digest, size = _seal_blob(tmp_dir / _BLOB)
        created = time.time()
        full_meta.update(key=key, format=FORMAT_VERSION, sha256=digest, size=size, created=created)
        _write_new(tmp_dir / _META, _dump_meta(full_meta))
        _write_new(tmp_dir / _LAST_USED, b"")
        _fsync_dir(tmp_dir)
        entry_dir = self._entry_dir(key)
        shard = entry_dir.parent
        if os.path.islink(shard):
            # Never write an entry through a link: it would land outside the cache.
            self._ensure_dirs("quarantine")
            os.rename(shard, self.root / "quarantine" / f"{shard.name}.{time.time_ns()}")
            logger.warning(
                "cache directory %s is a symlink; moved to quarantine, a real one replaces it",
                shard,
            )
        os.makedirs(shard, mode=0o700, exist_ok=True)
        os.rename(tmp_dir, entry_dir)
        try:
            _fsync_dir(entry_dir.parent)
        except OSError as exc:
            # The entry is already in place and get() checks it before any use.
            logger.debug("could not fsync %s: %s", entry_dir.parent, exc)
        return Entry(key, entry_dir, entry_dir / _BLOB, full_meta, size, created, created)

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
            _check_built(blob)
            return extra

        try:
            return _ephemeral_entry(key, base_meta, run)
        except BlobNotWritten as exc:
            return _adopt_ephemeral(key, base_meta, exc.blob)

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
        """Remove the entry for ``key``; True if there was one.

        A symlink is unlinked, not followed.
        """
        _check_key(key)
        if not self._root_exists():
            return False
        with self._lock(key):
            return self._discard(key, quarantine=False)

    def clear(self) -> int:
        """Remove every entry (and the quarantine); returns the number of entries removed."""
        if not self._root_exists():
            return 0
        removed = sum(self.remove(key) for key in self._keys())
        quarantine = self.root / "quarantine"
        if quarantine.is_dir() and not quarantine.is_symlink():
            for item in quarantine.iterdir():
                _remove_tree(item)
        self._clean_tmp(0.0)
        return removed

    def prune(
        self, max_bytes: Optional[int] = None, max_age: Optional[float] = None
    ) -> list[Entry]:
        """Remove entries unused for more than ``max_age`` seconds, then the least recently used
        until the total size is at most ``max_bytes``. Returns the removed entries.
        """
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if max_age is not None and max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        listed = sorted(self.entries(), key=lambda e: e.last_used)
        now = time.time()
        removed: list[Entry] = []
        kept: list[Entry] = []
        for entry in listed:
            if max_age is not None and now - entry.last_used > max_age:
                if self.remove(entry.key):
                    removed.append(entry)
            else:
                kept.append(entry)
        if max_bytes is not None:
            total = sum(e.size for e in kept)
            for entry in kept:
                if total <= max_bytes:
                    break
                if self.remove(entry.key):
                    removed.append(entry)
                total -= entry.size
        return removed

    # -- internals -----------------------------------------------------------------------------

    def _root_exists(self) -> bool:
        """Whether the root exists as a directory; raises CacheError if it is not safe to use."""
        try:
            st = os.stat(self.root)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False
        if hasattr(os, "geteuid"):
            if st.st_uid != os.geteuid():
                raise CacheError(
                    f"refusing the cache directory {self.root}: it is owned by uid {st.st_uid}, "
                    f"not by this user (uid {os.geteuid()}); set RKORT_CACHE_DIR to a directory "
                    "you own"
                )
            if st.st_mode & 0o022:
                raise CacheError(
                    f"refusing the cache directory {self.root}: it is writable by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):o}); run `chmod 700 {self.root}` or set "
                    "RKORT_CACHE_DIR to a private directory"
                )
        return True

    def _ensure_dirs(self, *subdirs: str) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if not self._root_exists():  # e.g. a file in its place
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self.root))
        for sub in subdirs:
            path = self.root / sub
            if os.path.islink(path):
                raise OSError(
                    errno.ELOOP, "a symlink where the cache keeps its own directory", str(path)
                )
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
        for shard in _listdir(self._layout()):
            shard_dir = self._layout() / shard
            if len(shard) != 2 or shard_dir.is_symlink():
                continue
            for name in _listdir(shard_dir):
                if _KEY_RE.fullmatch(name) and name[:2] == shard:
                    yield name

    def _inspect(
        self, key: str, verify: bool, expect: Optional[Mapping[str, Any]] = None
    ) -> tuple[Optional[Entry], Optional[_Problem]]:
        entry_dir = self._entry_dir(key)
        try:
            st = os.lstat(entry_dir)
        except (FileNotFoundError, NotADirectoryError):
            return None, None
        if stat.S_ISLNK(st.st_mode):
            return None, _Problem(True, "the entry directory is a symlink")
        if not stat.S_ISDIR(st.st_mode):
            return None, _Problem(False, "the entry is not a directory")
        if not _owned(st):
            return None, _Problem(True, f"the entry directory is owned by uid {st.st_uid}")
        expected = os.path.join(os.path.realpath(self.root), entry_dir.relative_to(self.root))
        if os.path.realpath(entry_dir) != expected:
            return None, _Problem(True, "the entry directory resolves outside the cache root")

        meta_or_problem = _read_meta(entry_dir / _META, key)
        if isinstance(meta_or_problem, _Problem):
            return None, meta_or_problem
        meta = meta_or_problem
        for field, wanted in (expect or {}).items():
            if meta.get(field) != wanted:
                return None, _Problem(
                    False, f"meta.json has {field} {meta.get(field)!r}, this build needs {wanted!r}"
                )

        try:
            fd = os.open(entry_dir / _BLOB, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK)
        except FileNotFoundError:
            return None, _Problem(False, "the blob is missing")
        except OSError as exc:
            if os.path.islink(entry_dir / _BLOB):
                return None, _Problem(True, "the blob is a symlink")
            return None, _Problem(False, f"the blob cannot be opened ({exc})")
        try:
            blob_st = os.fstat(fd)
            if not stat.S_ISREG(blob_st.st_mode):
                return None, _Problem(True, "the blob is not a regular file")
            if not _owned(blob_st):
                return None, _Problem(True, f"the blob is owned by uid {blob_st.st_uid}")
            if blob_st.st_size != meta["size"]:
                return None, _Problem(
                    False, f"the blob is {blob_st.st_size} bytes, {meta['size']} were recorded"
                )
            if verify:
                try:
                    digest = _sha256_fd(fd)
                except OSError as exc:
                    return None, _Problem(False, f"the blob cannot be read ({exc})")
                if digest != meta["sha256"]:
                    return None, _Problem(False, "the blob's sha256 does not match meta.json")
        finally:
            os.close(fd)

        try:
            last_used = os.lstat(entry_dir / _LAST_USED).st_mtime
        except OSError:
            last_used = float(meta["created"])
        entry = Entry(
            key=key,
            dir=entry_dir,
            blob_path=entry_dir / _BLOB,
            meta=meta,
            size=meta["size"],
            created=float(meta["created"]),
            last_used=last_used,
        )
        return entry, None

    def _repair(
        self, key: str, problem: _Problem, expect: Optional[Mapping[str, Any]] = None
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
            entry, again = self._inspect(key, verify=True, expect=expect)
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
        _remove_tree(trash)
        return True

    def _touch(self, entry: Entry) -> Entry:
        try:
            fd = os.open(
                entry.dir / _LAST_USED,
                os.O_WRONLY | os.O_CREAT | _O_NOFOLLOW | _O_NONBLOCK,
                0o600,
            )
        except OSError as exc:
            logger.debug("could not record the use of %s: %s", entry.key, exc)
            return entry
        try:
            if os.utime in os.supports_fd:
                os.utime(fd)
            else:
                os.utime(entry.dir / _LAST_USED)
        except OSError as exc:
            logger.debug("could not record the use of %s: %s", entry.key, exc)
            return entry
        finally:
            os.close(fd)
        return dataclasses.replace(entry, last_used=time.time())

    def _clean_tmp(self, min_age: float, holding: Optional[str] = None) -> None:
        """Delete leftovers of killed builds: old enough (any age for ``holding``, the key whose
        lock the caller holds), and their key's lock is free."""
        now = time.time()
        for sub in ("tmp", "hashes"):
            parent = self.root / sub
            for name in _listdir(parent):
                path = parent / name
                if sub == "hashes" and not name.startswith(".tmp-"):
                    continue
                key = name.split(".", 1)[0]
                try:
                    if key != holding and now - os.lstat(path).st_mtime < min_age:
                        continue
                except OSError:
                    continue
                if sub == "tmp" and _KEY_RE.fullmatch(key):
                    lock = self._lock(key)
                    try:
                        lock.acquire(timeout=0)
                    except (filelock.Timeout, OSError):
                        continue  # a build of that key is running
                    try:
                        _remove_tree(path)
                    finally:
                        lock.release()
                else:
                    _remove_tree(path)


# -- module helpers ----------------------------------------------------------------------------


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"not a cache key: {key!r} (keys come from make_key)")


def _checked_meta(meta: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(meta).__name__}")
    clash = _RESERVED_META.intersection(meta)
    if clash:
        raise ValueError(f"{what} uses keys the cache sets itself: {sorted(clash)}")
    as_dict = dict(meta)
    _dump_meta(as_dict)  # fail before an expensive build, not after
    return as_dict


def _canonical(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as they read back from meta.json (tuples become lists, and so on)."""
    return dict(json.loads(json.dumps(dict(values), allow_nan=False)))


def _dump_meta(meta: Mapping[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, indent=1, allow_nan=False).encode()


def _owned(st: os.stat_result) -> bool:
    return not hasattr(os, "geteuid") or st.st_uid == os.geteuid()


def _stamp(real: str, st: os.stat_result) -> list[Any]:
    return [real, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev]


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    os.lseek(fd, 0, os.SEEK_SET)
    with open(fd, "rb", buffering=0, closefd=False) as stream:
        while True:
            n = stream.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def _sha256_file(path: str) -> tuple[str, os.stat_result, os.stat_result]:
    """sha256 of a regular file, with its stat before and after reading."""
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise ValueError(f"{path} is not a regular file")
        digest = _sha256_fd(fd)
        return digest, before, os.fstat(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> Any:
    """Parsed JSON of a small regular file, or None if it is absent, a symlink or not JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _owned(st) or st.st_size > _MAX_META_BYTES:
            return None
        with open(fd, "rb", closefd=False) as stream:
            return json.loads(stream.read(_MAX_META_BYTES + 1))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _read_meta(path: Path, key: str) -> Union[dict, _Problem]:
    if not os.path.lexists(path):
        return _Problem(False, "meta.json is missing")
    if os.path.islink(path):
        return _Problem(True, "meta.json is a symlink")
    meta = _read_json(path)
    if meta is None:
        return _Problem(False, "meta.json is unreadable or not valid JSON")
    if not isinstance(meta, dict):
        return _Problem(False, "meta.json is not a JSON object")
    if meta.get("format") != FORMAT_VERSION:
        return _Problem(
            False, f"meta.json has format {meta.get('format')!r}, this rkort reads {FORMAT_VERSION}"
        )
    if meta.get("key") != key:
        return _Problem(False, f"meta.json names key {meta.get('key')!r}")
    digest, size, created = meta.get("sha256"), meta.get("size"), meta.get("created")
    if not isinstance(digest, str) or not _KEY_RE.fullmatch(digest):
        return _Problem(False, "meta.json has no valid sha256")
    if type(size) is not int or size < 0:
        return _Problem(False, "meta.json has no valid size")
    if type(created) not in (int, float):
        return _Problem(False, "meta.json has no valid created time")
    return meta


def _check_built(blob: Path) -> None:
    try:
        st = os.lstat(blob)
    except FileNotFoundError:
        raise CacheError(f"the build returned without writing the blob to {blob}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CacheError(f"the build left something other than a regular file at {blob}")


def _seal_blob(blob: Path) -> tuple[str, int]:
    """Make the blob private and durable; returns its sha256 and size."""
    fd = os.open(blob, os.O_RDONLY | _O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o600)
        digest = _sha256_fd(fd)
        os.fsync(fd)
        return digest, os.fstat(fd).st_size
    finally:
        os.close(fd)


def _ephemeral_entry(
    key: str,
    base_meta: dict[str, Any],
    produce: Callable[[Path], Optional[Mapping[str, Any]]],
    tmp_dir: Optional[Path] = None,
) -> Entry:
    """Run ``produce(blob_path)`` in a new private temporary directory (or ``tmp_dir``, which is
    then owned) and describe the result."""
    if tmp_dir is None:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"rkort-{key[:12]}-"))
    try:
        blob = tmp_dir / _BLOB
        extra = produce(blob)
        full_meta = dict(base_meta)
        if extra is not None:
            full_meta.update(_checked_meta(extra, "the metadata build returned"))
        digest, size = _seal_blob(blob)
        created = time.time()
        full_meta.update(key=key, format=FORMAT_VERSION, sha256=digest, size=size, created=created)
        _write_new(tmp_dir / _META, _dump_meta(full_meta))
    except BaseException:
        _remove_tree(tmp_dir)
        raise
    return Entry(key, tmp_dir, blob, full_meta, size, created, created, ephemeral=True)


def _adopt_ephemeral(key: str, base_meta: dict[str, Any], blob: Path) -> Entry:
    """An ephemeral entry for a finished blob a build left alone in a private directory."""
    blob = Path(blob)
    if blob.name != _BLOB:
        blob = blob.rename(blob.parent / _BLOB)
    return _ephemeral_entry(key, base_meta, lambda dest: None, blob.parent)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # Windows cannot open directories; its renames are durable enough
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise  # some filesystems cannot fsync a directory; anything else is a real error
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Remove a file, symlink (not its target) or directory tree; a missing path is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _acquire(lock: filelock.FileLock, key: str) -> None:
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        logger.info("waiting for another process to finish building cache entry %s", key)
        lock.acquire()
