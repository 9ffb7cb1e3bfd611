"""What a cache entry is: its key, its metadata, and the checks that say it can be trusted.

A key is the sha256 of the canonical JSON of everything that changes a blob (see
:func:`make_key`); metadata is JSON (never pickled), and :func:`read_meta` refuses anything that
does not describe the entry it sits in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import filelock
import platformdirs

from ..files import (
    O_NOFOLLOW,
    O_NONBLOCK,
    listdir,
    owned,
    read_json,
    remove_tree,
    sha256_fd,
    write_atomic,
    write_new,
)

#: Version of the on-disk layout and metadata; part of every key, so a bump orphans old entries.
FORMAT_VERSION: int = 1


BLOB = "model.rknn"
META = "meta.json"
LAST_USED = "last_used"
_RESERVED_META = frozenset({"key", "format", "sha256", "size", "created"})


#: Metadata fields that say what a blob is for. The key is derived from the same facts, so an
#: entry whose stored value differs from the one the caller passes to get_or_build was not written
#: by this build under this key (copied from elsewhere, edited, or written by another tool): it is
#: removed and rebuilt rather than loaded.
IDENTITY_FIELDS = ("toolkit", "target", "dtype", "inputs")


KEY_RE = re.compile(r"[0-9a-f]{64}")


_MAX_META_BYTES = 1 << 20


class CacheError(Exception):
    """The cache cannot be used safely: an unsafe root, or a build that broke its contract."""


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


class Problem(NamedTuple):
    unsafe: bool  # True: refused for security and quarantined; False: corrupt and deleted
    reason: str


def check_key(key: str) -> None:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ValueError(f"not a cache key: {key!r} (keys come from make_key)")


def checked_meta(meta: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(meta).__name__}")
    clash = _RESERVED_META.intersection(meta)
    if clash:
        raise ValueError(f"{what} uses keys the cache sets itself: {sorted(clash)}")
    as_dict = dict(meta)
    dump_meta(as_dict)  # fail before an expensive build, not after
    return as_dict


def canonical(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as they read back from meta.json (tuples become lists, and so on)."""
    return dict(json.loads(json.dumps(dict(values), allow_nan=False)))


def dump_meta(meta: Mapping[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, indent=1, allow_nan=False).encode()


def read_meta(path: Path, key: str) -> Union[dict, Problem]:
    if not os.path.lexists(path):
        return Problem(False, "meta.json is missing")
    if os.path.islink(path):
        return Problem(True, "meta.json is a symlink")
    meta = read_json(path)
    if meta is None:
        return Problem(False, "meta.json is unreadable or not valid JSON")
    if not isinstance(meta, dict):
        return Problem(False, "meta.json is not a JSON object")
    if meta.get("format") != FORMAT_VERSION:
        return Problem(
            False, f"meta.json has format {meta.get('format')!r}, this rkort reads {FORMAT_VERSION}"
        )
    if meta.get("key") != key:
        return Problem(False, f"meta.json names key {meta.get('key')!r}")
    digest, size, created = meta.get("sha256"), meta.get("size"), meta.get("created")
    if not isinstance(digest, str) or not KEY_RE.fullmatch(digest):
        return Problem(False, "meta.json has no valid sha256")
    if type(size) is not int or size < 0:
        return Problem(False, "meta.json has no valid size")
    if type(created) not in (int, float):
        return Problem(False, "meta.json has no valid created time")
    return meta


def inspect_entry(
    root: Path, entry_dir: Path, key: str, verify: bool, expect: Optional[Mapping[str, Any]] = None
) -> tuple[Optional[Entry], Optional[Problem]]:
    """The entry in ``entry_dir`` and None, or None and what is wrong with it (``verify``: check
    the blob's sha256 too; ``expect``: metadata fields it must have)."""
    try:
        st = os.lstat(entry_dir)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    if stat.S_ISLNK(st.st_mode):
        return None, Problem(True, "the entry directory is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        return None, Problem(False, "the entry is not a directory")
    if not owned(st):
        return None, Problem(True, f"the entry directory is owned by uid {st.st_uid}")
    expected = os.path.join(os.path.realpath(root), entry_dir.relative_to(root))
    if os.path.realpath(entry_dir) != expected:
        return None, Problem(True, "the entry directory resolves outside the cache root")

    meta_or_problem = read_meta(entry_dir / META, key)
    if isinstance(meta_or_problem, Problem):
        return None, meta_or_problem
    meta = meta_or_problem
    for field, wanted in (expect or {}).items():
        if meta.get(field) != wanted:
            return None, Problem(
                False, f"meta.json has {field} {meta.get(field)!r}, this build needs {wanted!r}"
            )

    try:
        fd = os.open(entry_dir / BLOB, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK)
    except FileNotFoundError:
        return None, Problem(False, "the blob is missing")
    except OSError as exc:
        if os.path.islink(entry_dir / BLOB):
            return None, Problem(True, "the blob is a symlink")
        return None, Problem(False, f"the blob cannot be opened ({exc})")
    try:
        blob_st = os.fstat(fd)
        if not stat.S_ISREG(blob_st.st_mode):
            return None, Problem(True, "the blob is not a regular file")
        if not owned(blob_st):
            return None, Problem(True, f"the blob is owned by uid {blob_st.st_uid}")
        if blob_st.st_size != meta["size"]:
            return None, Problem(
                False, f"the blob is {blob_st.st_size} bytes, {meta['size']} were recorded"
            )
        if verify and not _verified_before(entry_dir, blob_st, meta["sha256"]):
            try:
                digest = sha256_fd(fd)
            except OSError as exc:
                return None, Problem(False, f"the blob cannot be read ({exc})")
            if digest != meta["sha256"]:
                return None, Problem(False, "the blob's sha256 does not match meta.json")
            _remember_verified(entry_dir, blob_st, digest)
    finally:
        os.close(fd)

    try:
        last_used = os.lstat(entry_dir / LAST_USED).st_mtime
    except OSError:
        last_used = float(meta["created"])
    entry = Entry(
        key=key,
        dir=entry_dir,
        blob_path=entry_dir / BLOB,
        meta=meta,
        size=meta["size"],
        created=float(meta["created"]),
        last_used=last_used,
    )
    return entry, None


def check_built(blob: Path) -> None:
    try:
        st = os.lstat(blob)
    except FileNotFoundError:
        raise CacheError(f"the build returned without writing the blob to {blob}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CacheError(f"the build left something other than a regular file at {blob}")


def seal_blob(blob: Path) -> tuple[str, int]:
    """Make the blob private and durable; returns its sha256 and size."""
    fd = os.open(blob, os.O_RDONLY | O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o600)
        digest = sha256_fd(fd)
        os.fsync(fd)
        return digest, os.fstat(fd).st_size
    finally:
        os.close(fd)


def ephemeral_entry(
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
        blob = tmp_dir / BLOB
        extra = produce(blob)
        full_meta = dict(base_meta)
        if extra is not None:
            full_meta.update(checked_meta(extra, "the metadata build returned"))
        digest, size = seal_blob(blob)
        created = time.time()
        full_meta.update(key=key, format=FORMAT_VERSION, sha256=digest, size=size, created=created)
        write_new(tmp_dir / META, dump_meta(full_meta))
    except BaseException:
        remove_tree(tmp_dir)
        raise
    return Entry(key, tmp_dir, blob, full_meta, size, created, created, ephemeral=True)


def adopt_ephemeral(key: str, base_meta: dict[str, Any], blob: Path) -> Entry:
    """An ephemeral entry for a finished blob a build left alone in a private directory."""
    blob = Path(blob)
    if blob.name != BLOB:
        blob = blob.rename(blob.parent / BLOB)
    return ephemeral_entry(key, base_meta, lambda dest: None, blob.parent)


def root_usable(root: Path) -> bool:
    """Whether the root exists as a directory; raises CacheError if it is not safe to use."""
    try:
        st = os.stat(root)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    if hasattr(os, "geteuid"):
        if st.st_uid != os.geteuid():
            raise CacheError(
                f"refusing the cache directory {root}: it is owned by uid {st.st_uid}, "
                f"not by this user (uid {os.geteuid()}); set RKORT_CACHE_DIR to a directory "
                "you own"
            )
        if st.st_mode & 0o022:
            raise CacheError(
                f"refusing the cache directory {root}: it is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); run `chmod 700 {root}` or set "
                "RKORT_CACHE_DIR to a private directory"
            )
    return True


def prune_order(
    entries: Sequence[Entry], max_bytes: Optional[int], max_age: Optional[float], now: float
) -> list[Entry]:
    """The entries a prune removes, in order: those unused for more than ``max_age`` seconds,
    then the least recently used until the rest fit in ``max_bytes``."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if max_age is not None and max_age < 0:
        raise ValueError(f"max_age must be >= 0, got {max_age}")
    listed = sorted(entries, key=lambda e: e.last_used)
    aged = [e for e in listed if max_age is not None and now - e.last_used > max_age]
    kept = [e for e in listed if e not in aged]
    chosen = list(aged)
    if max_bytes is not None:
        total = sum(e.size for e in kept)
        for entry in kept:
            if total <= max_bytes:
                break
            chosen.append(entry)
            total -= entry.size
    return chosen


#: The blob's stat when its sha256 last matched: an unchanged file is not read again.
VERIFIED = "verified"
_RACY_S = 2.0


def _blob_stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev]


def _verified_before(entry_dir: Path, st: os.stat_result, digest: str) -> bool:
    memo = read_json(entry_dir / VERIFIED)
    return (
        isinstance(memo, dict)
        and memo.get("stamp") == _blob_stamp(st)
        and memo.get("sha256") == digest
    )


def _remember_verified(entry_dir: Path, st: os.stat_result, digest: str) -> None:
    # A file changed within a timestamp tick of now could change again unseen ("racily
    # clean", as git and ccache say): such a blob is hashed again next time.
    if time.time() - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 < _RACY_S:
        return
    try:
        write_atomic(
            entry_dir / VERIFIED, json.dumps({"stamp": _blob_stamp(st), "sha256": digest}).encode()
        )
    except OSError:
        pass  # a read-only cache: the blob is hashed on every use, which is only slower


def clean_tmp(
    root: Path,
    lock: Callable[[str], filelock.FileLock],
    min_age: float,
    holding: Optional[str] = None,
) -> None:
    """Delete a cache's leftovers of killed builds: old enough (any age for ``holding``, the key
    whose lock the caller holds), and their key's lock (``lock(key)``) is free."""
    now = time.time()
    for sub in ("tmp", "hashes"):
        parent = root / sub
        for name in listdir(parent):
            path = parent / name
            if sub == "hashes" and not name.startswith(".tmp-"):
                continue
            key = name.split(".", 1)[0]
            try:
                if key != holding and now - os.lstat(path).st_mtime < min_age:
                    continue
            except OSError:
                continue
            if sub == "tmp" and KEY_RE.fullmatch(key):
                try:
                    with lock(key).acquire(timeout=0):
                        remove_tree(path)
                except (filelock.Timeout, OSError):
                    continue  # a build of that key is running
            else:
                remove_tree(path)
