"""The shared remote cache: entries and program records fetched from an fsspec URL on a local miss,
and the ones built here published to it.

The remote mirrors the local layout (see :mod:`rkort.cache.store`)::

    <url>/v1/ab/<key>/model.rknn            the blob
                      meta.json             its metadata, exactly as the building cache wrote it
    <url>/programs/<model[:2]>/<model>/<record key>.json

A fetched entry is downloaded into the cache's ``tmp/``, checked exactly as a local entry is
(format, key, size, sha256, and the identity fields the caller expects) and renamed into place
under the key's lock, so that many processes on one machine download it once. A fetched record
is checked by its own sha256 (:func:`rkort.cache.records.parse`). Publishing uploads the blob
before its meta.json, so a reader that finds meta.json finds a complete blob; on a local
filesystem each object is written under a temporary name and renamed.

A failing remote (unreachable, refused, not installed) never fails a session: one warning per
process and URL, the remote left alone for a minute, and the local path taken. An object that
fails its checks (truncated, tampered, another format) is refused with a warning and never used.
fsspec (and s3fs for ``s3://``) is imported only when a remote is first used:
``pip install 'rkort[fleet]'``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from ..files import fsync_dir, remove_tree, write_atomic, write_new
from .entry import BLOB, FORMAT_VERSION, KEY_RE, LAST_USED, META, Entry, inspect_entry, read_meta
from .records import parse
from .store import Cache

logger = logging.getLogger("rkort.cache")

#: How long a remote that failed is left alone before it is tried again (seconds).
RETRY_AFTER_S = 60.0
_MAX_META = 1 << 20
_MAX_RECORD = 64 << 20
_LOCAL = ("file", "local")
_READ_ONLY = ("http", "https")

# Per process and URL: when a failed remote may be tried again, and whether it was warned about.
_down: dict[str, float] = {}
_warned: dict[str, object] = {}


class Refused(Exception):
    """A remote object that failed its checks."""


class Remote:
    """The remote cache of one :class:`~rkort.cache.Cache` (its ``remote_url``), read on a local
    miss and, with ``remote_write``, given what the cache builds. No method raises."""

    def __init__(self, cache: Cache) -> None:
        if not cache.remote_url:
            raise ValueError("the cache names no remote")
        self.cache = cache
        self.url = cache.remote_url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0].lower() if "://" in self.url else "file"
        self.write = cache.remote_write
        self._fs: Optional[tuple[int, Any, str]] = None
        self._synced: set[str] = set()

    def __repr__(self) -> str:
        return f"Remote({self.url!r}, write={self.write})"

    # -- entries -------------------------------------------------------------------------------

    def fetch(self, key: str, expect: Mapping[str, Any]) -> Optional[Entry]:
        """The entry ``key`` downloaded into the local cache and checked, or None (absent from the
        remote, refused, or the remote or the local cache unusable)."""
        cache = self.cache
        if not self._usable():
            return None
        try:
            cache._ensure_dirs(f"v{FORMAT_VERSION}", "tmp", "locks")
            lock = cache._lock(key)
            lock.acquire()
        except OSError as exc:
            logger.debug("cannot fetch %s into %s: %s", key, cache.root, exc)
            return None
        try:
            here = cache._entry_dir(key)
            entry, problem = inspect_entry(cache.root, here, key, verify=True, expect=expect)
            if entry is not None or problem is not None:
                return entry  # fetched (or built) meanwhile; a bad one is the caller's to repair
            return self._fetch_locked(key, expect)
        finally:
            lock.release()

    def _fetch_locked(self, key: str, expect: Mapping[str, Any]) -> Optional[Entry]:
        cache = self.cache
        try:
            tmp_dir = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache.root / "tmp"))
        except OSError as exc:
            logger.debug("cannot fetch %s into %s: %s", key, cache.root, exc)
            return None
        try:
            if not self._download_entry(key, tmp_dir, expect):
                return None
            entry, problem = inspect_entry(cache.root, tmp_dir, key, verify=True, expect=expect)
            if problem is not None:
                raise Refused(problem.reason)
            write_new(tmp_dir / LAST_USED, b"")
            fsync_dir(tmp_dir)
            entry_dir = cache.place(tmp_dir, key)
        except Refused as exc:
            logger.warning(
                "remote cache %s: entry %s is refused (%s); it is not used", self.url, key, exc
            )
            return None
        except Exception as exc:  # noqa: BLE001 - whatever the remote's library raises
            self._failed(f"fetching entry {key[:12]}", exc)
            return None
        finally:
            remove_tree(tmp_dir)
        logger.info("fetched cache entry %s from %s", key, self.url)
        assert entry is not None
        now = time.time()
        return dataclasses.replace(entry, dir=entry_dir, blob_path=entry_dir / BLOB, last_used=now)

    def _download_entry(self, key: str, tmp_dir: Path, expect: Mapping[str, Any]) -> bool:
        """meta.json, checked, then the blob, into ``tmp_dir``; False when the remote lacks it."""
        fs, _ = self._filesystem()
        where = self._entry_path(key)
        try:
            data = fs.cat_file(f"{where}/{META}")
        except FileNotFoundError:
            return False
        if len(data) > _MAX_META:
            raise Refused(f"its meta.json is {len(data)} bytes")
        write_new(tmp_dir / META, bytes(data))
        meta = read_meta(tmp_dir / META, key)
        if not isinstance(meta, dict):
            raise Refused(meta.reason)
        for field, wanted in expect.items():
            if meta.get(field) != wanted:
                raise Refused(f"meta.json has {field} {meta.get(field)!r}, not {wanted!r}")
        try:
            fs.get_file(f"{where}/{BLOB}", str(tmp_dir / BLOB))
        except FileNotFoundError:
            raise Refused("its blob is missing") from None
        os.chmod(tmp_dir / BLOB, 0o600)
        fd = os.open(tmp_dir / BLOB, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def publish(self, entry: Entry) -> None:
        """Upload an entry built here, blob first (when this cache publishes)."""
        if not self._may_write():
            return
        try:
            where = self._entry_path(entry.key)
            self._upload(entry.blob_path, f"{where}/{BLOB}")
            self._upload(entry.dir / META, f"{where}/{META}")
        except Exception as exc:  # noqa: BLE001 - whatever the remote's library raises
            self._failed(f"publishing entry {entry.key[:12]}", exc)
            return
        logger.info("published cache entry %s to %s", entry.key, self.url)

    # -- program records -----------------------------------------------------------------------

    def fetch_record(self, model: str, key: str) -> Optional[dict[str, Any]]:
        """The body of record ``key`` of ``model`` downloaded into the local cache and checked, or
        None (a checked body is returned even when the local cache cannot keep it)."""
        records = self.cache.records
        if not self._usable():
            return None
        try:
            self.cache._ensure_dirs("locks")
            lock = self.cache._lock(key)
            lock.acquire()
        except OSError as exc:
            logger.debug("cannot fetch record %s into %s: %s", key, self.cache.root, exc)
            return None
        try:
            body = records.local(model, key)
            if body is not None:
                return body  # fetched meanwhile
            try:
                fs, _ = self._filesystem()
                data = bytes(fs.cat_file(self._record_path(model, key)))
                body = _checked_record(data, key)
            except FileNotFoundError:
                return None
            except Refused as exc:
                logger.warning(
                    "remote cache %s: program record %s is refused (%s); it is not used",
                    self.url,
                    key,
                    exc,
                )
                return None
            except Exception as exc:  # noqa: BLE001 - whatever the remote's library raises
                self._failed(f"fetching program record {key[:12]}", exc)
                return None
            try:
                write_atomic(records.make_dir(model) / f"{key}.json", data)
            except OSError as exc:
                logger.debug("could not keep program record %s in %s: %s", key, records.root, exc)
            logger.info("fetched program record %s from %s", key, self.url)
            return body
        finally:
            lock.release()

    def publish_record(self, model: str, key: str, data: bytes) -> None:
        """Upload a record stored here (when this cache publishes)."""
        if not self._may_write():
            return
        try:
            self._upload(data, self._record_path(model, key))
        except Exception as exc:  # noqa: BLE001 - whatever the remote's library raises
            self._failed(f"publishing program record {key[:12]}", exc)

    def sync_records(self, model: str) -> None:
        """Fetch the remote's records of ``model`` missing here; once per process and model (a
        board learns its warmed shapes from them)."""
        if model in self._synced or not self._usable():
            return
        self._synced.add(model)
        try:
            fs, _ = self._filesystem()
            listed = fs.ls(self._record_path(model, None), detail=False)
            names = [str(n).rstrip("/").rsplit("/", 1)[-1] for n in listed]
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - some remotes (plain https) cannot list
            logger.debug("cannot list the program records of %s in %s: %s", model, self.url, exc)
            return
        for name in names:
            key = name[: -len(".json")]
            if name.endswith(".json") and KEY_RE.fullmatch(key):
                if self.cache.records.local(model, key) is None:
                    self.fetch_record(model, key)

    # -- the remote filesystem -----------------------------------------------------------------

    def _filesystem(self) -> tuple[Any, str]:
        """The fsspec filesystem and base path, made once per process (never shared by fork)."""
        made = self._fs
        if made is None or made[0] != os.getpid():
            fs, base = _open_filesystem(self.url, self.protocol)
            made = self._fs = (os.getpid(), fs, str(base).rstrip("/"))
        return made[1], made[2]

    def _entry_path(self, key: str) -> str:
        return f"{self._filesystem()[1]}/v{FORMAT_VERSION}/{key[:2]}/{key}"

    def _record_path(self, model: str, key: Optional[str]) -> str:
        directory = f"{self._filesystem()[1]}/programs/{model[:2]}/{model}"
        return directory if key is None else f"{directory}/{key}.json"

    def _upload(self, source: Union[Path, bytes], path: str) -> None:
        fs, _ = self._filesystem()
        if self.protocol not in _LOCAL:
            if isinstance(source, Path):
                fs.put_file(str(source), path)
            else:
                fs.pipe_file(path, source)
            return
        # A local (or mounted) remote: readers see the old object or the new one, never a part.
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        part = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
        try:
            if isinstance(source, Path):
                fs.put_file(str(source), part)
            else:
                fs.pipe_file(part, source)
            fs.mv(part, path)
        except BaseException:
            try:
                fs.rm_file(part)
            except Exception:  # noqa: BLE001 - best effort
                pass
            raise

    def _usable(self) -> bool:
        return time.monotonic() >= _down.get(self.url, 0.0)

    def _may_write(self) -> bool:
        if not self.write or not self._usable():
            return False
        if self.protocol in _READ_ONLY:
            # Publishing is off; fetching goes on (the remote itself is fine).
            self.write = False
            token = object()
            first = _warned.setdefault(f"{self.url} write", token) is token
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "remote cache %s: %s:// remotes are read-only; not publishing to it",
                self.url,
                self.protocol,
            )
            return False
        return True

    def _failed(self, doing: str, exc: BaseException) -> None:
        """Leave the remote alone for a while; warn once per process and URL."""
        _down[self.url] = time.monotonic() + RETRY_AFTER_S
        token = object()
        first = _warned.setdefault(self.url, token) is token
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "remote cache %s: %s failed (%s: %s); using the local cache only",
            self.url,
            doing,
            type(exc).__name__,
            exc,
        )


def open_remote(cache: Cache) -> Remote:
    """The :class:`Remote` of a cache that names one (how :class:`Cache` opens it)."""
    return Remote(cache)


def _open_filesystem(url: str, protocol: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise ImportError(
            "a remote cache needs fsspec (and s3fs for s3://): pip install 'rkort[fleet]'"
        ) from None
    options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
    if protocol in ("s3", "s3a") and "config_kwargs" not in fsspec.config.conf.get(protocol, {}):
        # Fail over to the local path in seconds, not the minute botocore's defaults can take.
        options["config_kwargs"] = {
            "connect_timeout": 3,
            "read_timeout": 60,
            "retries": {"max_attempts": 2, "mode": "standard"},
        }
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def _checked_record(data: bytes, key: str) -> dict[str, Any]:
    if len(data) > _MAX_RECORD:
        raise Refused(f"it is {len(data)} bytes")
    try:
        body = parse(json.loads(data), key)
    except ValueError:
        body = None
    if body is None:
        raise Refused("not a program record of this key and format, or its sha256 does not match")
    return body
