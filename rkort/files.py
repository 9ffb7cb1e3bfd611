"""Durable, atomic file operations: a file is either absent or complete, never half-written.

Shared by the compiler (placing a finished blob) and the cache (entries, metadata, memos).
Everything here refuses to follow symlinks where a link could redirect a write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Union

StrPath = Union[str, "os.PathLike[str]"]

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CHUNK = 1 << 20


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


def place_file(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest`` so that ``dest`` is either absent or complete, across filesystems.

    If ``dest`` cannot be written (a full or read-only disk), the blob is moved into a private
    temporary directory instead and :class:`BlobNotWritten` names it, so that the cache can keep
    it rather than compile it again.
    """
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
    blob = src  # where the complete blob is now
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Same filesystem: one rename, no copy and no extra space.
            os.rename(src, tmp)
            blob = tmp
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        if blob != tmp:
            unlink(tmp)  # a partial copy
        raise _rescue(blob, dest, exc) from exc
    except BaseException:
        unlink(tmp)
        raise
    if blob == src:
        unlink(src)


def _rescue(blob: Path, dest: Path, exc: OSError) -> OSError:
    """``blob`` moved into a private directory, as a BlobNotWritten; ``exc`` if it cannot be."""
    if not os.path.isfile(blob):
        return exc
    try:
        keep = Path(tempfile.mkdtemp(prefix="rkort-blob-")) / dest.name
    except OSError:
        return exc
    try:
        try:
            os.rename(blob, keep)
        except OSError:
            shutil.copyfile(blob, keep)
            unlink(blob)
    except OSError:
        shutil.rmtree(keep.parent, ignore_errors=True)
        return exc
    return BlobNotWritten(exc.errno, exc.strerror or str(exc), keep, dest)


def unlink(path: StrPath) -> None:
    """Remove a file; a missing one is fine."""
    try:
        os.unlink(path)
    except OSError:
        pass


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, private and fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` by a rename: readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        unlink(tmp)
        raise


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (a no-op where directories cannot be opened)."""
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


def remove_tree(path: Path) -> None:
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


def listdir(path: Path) -> list[str]:
    """Sorted names in a directory; [] when it cannot be read."""
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def owned(st: os.stat_result) -> bool:
    """True when this user owns the file (always, where there are no uids)."""
    return not hasattr(os, "geteuid") or st.st_uid == os.geteuid()


def private_dir(directory: Path) -> Path:
    """``directory``, made (mode 0700) if missing; refused (OSError) if it is a link, not a
    directory, or another user's."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or not owned(st):
        raise OSError(f"refusing {directory}: not a directory of this user")
    return directory


def sha256_fd(fd: int) -> str:
    """The sha256 hex digest of an open file, read from its start."""
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


def sha256_file(path: str) -> tuple[str, os.stat_result, os.stat_result]:
    """sha256 of a regular file, with its stat before and after reading."""
    fd = os.open(path, os.O_RDONLY | O_NONBLOCK)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise ValueError(f"{path} is not a regular file")
        digest = sha256_fd(fd)
        return digest, before, os.fstat(fd)
    finally:
        os.close(fd)


def read_json(path: Path, limit: int = 1 << 20) -> Any:
    """Parsed JSON of a small regular file this user owns, or None if it is absent, a symlink,
    too large or not JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not owned(st) or st.st_size > limit:
            return None
        with open(fd, "rb", closefd=False) as stream:
            return json.loads(stream.read(limit + 1))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def owned_tempdir(prefix: str, create: bool = True) -> Path:
    """A new private temporary directory named after this process (``<prefix><pid>-<random>``);
    with ``create=False`` only its name (the caller makes it, mode 0700, when it needs it).

    Directories of the same prefix whose process is gone are removed first: a process killed
    before it could clean up leaves them with nobody else to do so.
    """
    tmp = Path(tempfile.gettempdir())
    for name in listdir(tmp):
        owner = name[len(prefix) :].split("-", 1)[0] if name.startswith(prefix) else ""
        if not owner.isdigit() or pid_alive(int(owner)):
            continue
        try:
            if not owned(os.lstat(tmp / name)):
                continue
        except OSError:
            continue
        shutil.rmtree(tmp / name, ignore_errors=True)
    if not create:
        return tmp / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def pid_alive(pid: int) -> bool:
    """True while a process ``pid`` exists (whoever owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True
