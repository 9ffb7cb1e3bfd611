"""Bundles: checked cache entries and their program records in one tar file, exported where blobs are
built and imported on the boards (``rkort cache export|import``).

A bundle is a tar (gzip-compressed when its name ends in ``.gz`` or ``.tgz``) in the cache's own
layout, its manifest first::

    rkort-bundle.json                          formats, entry keys with sha256 and size, records
    v1/ab/<key>/meta.json                      each entry's metadata, exactly as the cache wrote it
    v1/ab/<key>/model.rknn                     its blob
    programs/ab/<model>/<record key>.json      records whose blobs are all in the bundle

An import copies every member into the cache's ``tmp/`` and checks all of it before anything is
put in place: names (no absolute path, no ``..``, nothing outside the layout), types (regular
files only: no symlink, hard link, device or FIFO), formats (the bundle's, the cache's, the
records'), each entry as :meth:`Cache.get` checks one (key, size, sha256) and each record by its
own sha256. Any failure refuses the whole bundle and leaves the cache as it was. Then each entry
is renamed into place under its key's lock (the rename that commits a build), the records after
the blobs they name; if that fails, what it placed is removed again. What "atomic" can honestly
mean for many entries: a process killed during those renames leaves the entries renamed so far,
each complete and checked, never a partial one (the staging directory is swept as a killed
build's is). Imported files are the importing user's (0600, directories 0700).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Callable, Optional, TypeVar

from .. import files
from ..files import O_NOFOLLOW, StrPath, fsync_dir, read_json, remove_tree, unlink, write_new
from ..version import __version__
from .entry import BLOB, FORMAT_VERSION, KEY_RE, LAST_USED, META, CacheError, Entry, inspect_entry
from .records import RECORD_FORMAT, parse
from .store import Cache

MANIFEST = "rkort-bundle.json"
BUNDLE_FORMAT = 1
_MAX_JSON = 64 << 20
_CHUNK = 1 << 20
_ENTRY_RE = re.compile(r"v(\d+)/([0-9a-f]{2})/([0-9a-f]{64})/(meta\.json|model\.rknn)")
_RECORD_RE = re.compile(r"programs/([0-9a-f]{2})/([0-9a-f]{64})/([0-9a-f]{64})\.json")
T = TypeVar("T")


class BundleError(CacheError):
    """A bundle that cannot be exported or imported; an import that raises it changed nothing."""


@dataclasses.dataclass(frozen=True)
class Exported:
    """What :func:`export_bundle` wrote."""

    path: Path
    entries: int
    records: int
    bytes: int
    skipped: tuple[tuple[str, str], ...] = ()  # (key, why) of entries that failed their checks


@dataclasses.dataclass(frozen=True)
class Imported:
    """What :func:`import_bundle` put in the cache."""

    entries: int
    present: int  # entries the cache already had (kept as they were)
    records: int


# -- export -------------------------------------------------------------------------------------


def export_bundle(
    cache: Cache, out: StrPath, *, target: Optional[str] = None, models: Sequence[str] = ()
) -> Exported:
    """Write the cache's checked entries (for ``target``, of ``models``: model file paths or
    names as the entries record them, or content hashes) and their records to ``out``.

    ``out`` appears complete or not at all. Raises :class:`BundleError` when nothing matches.
    """
    out = Path(os.path.abspath(os.fspath(out)))
    record_files = _record_files(cache)
    models_of: dict[str, set[str]] = {}
    for model, _, body in record_files:
        for key in _npu_keys(body):
            models_of.setdefault(key, set()).add(model)
    chosen: list[Entry] = []
    skipped: list[tuple[str, str]] = []
    for listed in sorted(cache.entries(), key=lambda e: e.key):
        if target is not None and listed.meta.get("target") != target:
            continue
        if models and not any(
            _matches(listed, m, models_of.get(listed.key, set())) for m in models
        ):
            continue
        entry, problem = inspect_entry(cache.root, listed.dir, listed.key, verify=True)
        if entry is None:
            skipped.append((listed.key, problem.reason if problem else "it vanished"))
            continue
        chosen.append(entry)
    if not chosen:
        wanted = f" for {target}" if target else ""
        wanted += f" of {', '.join(models)}" if models else ""
        raise BundleError(f"the cache at {cache.root} holds no entry{wanted} to export")
    keys = {e.key for e in chosen}
    records = [
        (model, key, body)
        for model, key, body in record_files
        if _npu_keys(body) and set(_npu_keys(body)) <= keys
    ]
    manifest = {
        "bundle": "rkort",
        "bundle_format": BUNDLE_FORMAT,
        "cache_format": FORMAT_VERSION,
        "record_format": RECORD_FORMAT,
        "rkort": __version__,
        "created": time.time(),
        "entries": [{"key": e.key, "sha256": e.meta["sha256"], "size": e.size} for e in chosen],
        "records": [_record_name(model, key) for model, key, _ in records],
    }
    part = out.with_name(f".{out.name}.{os.getpid()}.part")
    mode = "w:gz" if out.name.endswith((".gz", ".tgz")) else "w"
    try:
        with open(part, "wb") as stream, tarfile.open(fileobj=stream, mode=mode) as tar:  # type: ignore[call-overload]
            _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=1).encode())
            for entry in chosen:
                _add_entry(tar, entry)
            for model, key, _ in records:
                path = cache.root / _record_name(model, key)
                _add_bytes(tar, _record_name(model, key), path.read_bytes())
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(part, out)
    except BaseException:
        unlink(part)
        raise
    return Exported(out, len(chosen), len(records), sum(e.size for e in chosen), tuple(skipped))


def _matches(entry: Entry, wanted: str, record_models: set[str]) -> bool:
    source = entry.meta.get("source")
    hashes = set(record_models)
    paths = {str(entry.meta.get("model") or "")}
    if isinstance(source, Mapping):
        hashes.add(str(source.get("model_sha256") or ""))
        paths.add(str(source.get("model") or ""))
    paths.discard("")
    if re.fullmatch(r"[0-9a-f]{8,64}", wanted) and any(h.startswith(wanted) for h in hashes if h):
        return True
    real = os.path.realpath(wanted)
    return any(
        p == wanted or os.path.basename(p) == wanted or os.path.realpath(p) == real for p in paths
    )


def _record_files(cache: Cache) -> list[tuple[str, str, dict[str, Any]]]:
    """(model, key, body) of every valid record in the cache (never the remote's)."""
    records = cache.records
    return [(m, key, body) for m in records.models() for key, body in records.local_all(m)]


def _npu_keys(body: Mapping[str, Any]) -> list[str]:
    parts = body.get("parts")
    if not isinstance(parts, list):
        return []
    return [str(p["key"]) for p in parts if isinstance(p, dict) and p.get("key")]


def _record_name(model: str, key: str) -> str:
    return f"programs/{model[:2]}/{model}/{key}.json"


def _info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o600
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_info(name, len(data), time.time()), io.BytesIO(data))


class _Hashing:
    """A file read through sha256."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data


def _add_entry(tar: tarfile.TarFile, entry: Entry) -> None:
    name = f"v{FORMAT_VERSION}/{entry.key[:2]}/{entry.key}"
    _add_bytes(tar, f"{name}/{META}", (entry.dir / META).read_bytes())
    fd = os.open(entry.blob_path, os.O_RDONLY | O_NOFOLLOW)
    with open(fd, "rb") as stream:
        if os.fstat(fd).st_size != entry.size:
            raise BundleError(f"cache entry {entry.key} changed while it was exported")
        reader = _Hashing(stream)
        tar.addfile(_info(f"{name}/{BLOB}", entry.size, entry.created), reader)  # type: ignore[arg-type]
    if reader.digest.hexdigest() != entry.meta["sha256"]:
        raise BundleError(f"cache entry {entry.key} changed while it was exported")


# -- import -------------------------------------------------------------------------------------


def import_bundle(cache: Cache, bundle: StrPath) -> Imported:
    """Check every member of ``bundle`` and put its entries and records in ``cache``.

    Raises :class:`BundleError` (the cache unchanged) for a bundle that is not one, is
    truncated, has a member outside the layout or of another type than a regular file, is of
    another format, or holds an entry or record that fails its checks.
    """
    bundle = Path(os.fspath(bundle))
    cache._ensure_dirs(f"v{FORMAT_VERSION}", "tmp", "locks")
    _sweep(cache.root / "tmp")
    staging = Path(tempfile.mkdtemp(prefix=f"import-{os.getpid()}-", dir=cache.root / "tmp"))
    try:
        manifest, staged_records = _unpack(bundle, staging)
        entries = _check_entries(cache, manifest, staging, bundle)
        records = _check_records(staged_records, bundle)
        return _commit(cache, entries, records)
    finally:
        remove_tree(staging)


def _sweep(tmp: Path) -> None:
    """Remove what imports killed before they could clean up left in ``tmp/``."""
    for name in files.listdir(tmp):
        pid = name.split("-")[1] if name.startswith("import-") else ""
        if pid.isdigit() and not files.pid_alive(int(pid)):
            remove_tree(tmp / name)


def _refuse(bundle: Path, why: str) -> BundleError:
    return BundleError(f"refusing the bundle {bundle}: {why}; nothing was imported")


def _unpack(bundle: Path, staging: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Every member written under ``staging`` after its name, type and size are checked; the
    manifest and the staged records by their bundle names."""
    manifest: Optional[dict[str, Any]] = None
    seen: set[str] = set()
    records: dict[str, Path] = {}
    try:
        tar = tarfile.open(bundle, "r:*")
    except (OSError, tarfile.TarError) as exc:
        raise _refuse(bundle, f"it cannot be read as a tar file ({exc})") from None
    with tar:
        while True:
            member = _reading(bundle, tar.next)
            if member is None:
                break
            name = _checked_name(bundle, member)
            if member.isdir():
                continue
            if name in seen:
                raise _refuse(bundle, f"member {name!r} appears twice")
            seen.add(name)
            if manifest is None:
                if name != MANIFEST:
                    raise _refuse(bundle, f"its first member is {name!r}, not {MANIFEST}")
                manifest = _read_manifest(bundle, _read_small(tar, member, bundle))
                continue
            dest = _staged_path(bundle, manifest, name, member, staging)
            _extract(tar, member, dest, bundle)
            if name.startswith("programs/"):
                records[name] = dest
            os.utime(staging)  # a live import: not swept as a killed one's leftovers
    if manifest is None:
        raise _refuse(bundle, f"it has no {MANIFEST}")
    missing = [r for r in manifest["records"] if r not in records]
    if missing:
        raise _refuse(bundle, f"it is incomplete: {missing[0]} is missing")
    return manifest, records


def _reading(bundle: Path, read: Callable[[], T]) -> T:
    """``read()``, with the errors of a truncated or damaged bundle as a refusal."""
    try:
        return read()
    except (EOFError, tarfile.TarError, zlib.error, OSError) as exc:
        raise _refuse(bundle, f"it is truncated or damaged ({exc})") from None


def _checked_name(bundle: Path, member: tarfile.TarInfo) -> str:
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise _refuse(bundle, f"member {name!r} would be written outside the cache")
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        raise _refuse(bundle, f"member {name!r} is a {kind} link (to {member.linkname!r})")
    if not (member.isreg() or member.isdir()):
        raise _refuse(bundle, f"member {name!r} is a device, FIFO or other special file")
    return name.rstrip("/") if member.isdir() else name


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, bundle: Path) -> bytes:
    if member.size > _MAX_JSON:
        raise _refuse(bundle, f"member {member.name!r} is too large ({member.size} bytes)")
    stream = _reading(bundle, lambda: tar.extractfile(member))
    assert stream is not None
    return _reading(bundle, stream.read)


def _read_manifest(bundle: Path, data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("bundle") != "rkort":
        raise _refuse(bundle, f"{MANIFEST} is not an rkort bundle manifest")
    for field, mine in (
        ("bundle_format", BUNDLE_FORMAT),
        ("cache_format", FORMAT_VERSION),
        ("record_format", RECORD_FORMAT),
    ):
        if manifest.get(field) != mine:
            raise _refuse(
                bundle,
                f"it is of a foreign format ({field} {manifest.get(field)!r}; this rkort "
                f"reads {mine}, rkort {manifest.get('rkort', '?')} wrote it)",
            )
    entries, records = manifest.get("entries"), manifest.get("records")
    if not isinstance(entries, list) or not isinstance(records, list):
        raise _refuse(bundle, f"{MANIFEST} lists no entries or records")
    for item in entries:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("key"), str)
            and KEY_RE.fullmatch(item["key"])
            and isinstance(item.get("sha256"), str)
            and type(item.get("size")) is int
        ):
            raise _refuse(bundle, f"{MANIFEST} lists a malformed entry: {item!r}")
    if not all(isinstance(r, str) and _RECORD_RE.fullmatch(r) for r in records):
        raise _refuse(bundle, f"{MANIFEST} lists a malformed record")
    manifest["entries"] = {item["key"]: item for item in entries}
    return manifest


def _staged_path(
    bundle: Path, manifest: Mapping[str, Any], name: str, member: tarfile.TarInfo, staging: Path
) -> Path:
    found = _ENTRY_RE.fullmatch(name)
    if found:
        version, shard, key, file = found.groups()
        if int(version) != FORMAT_VERSION:
            raise _refuse(
                bundle, f"member {name!r} is of cache format {version}; this rkort reads "
                f"{FORMAT_VERSION}"
            )  # fmt: skip
        if shard != key[:2] or key not in manifest["entries"]:
            raise _refuse(bundle, f"member {name!r} is not an entry its manifest lists")
        if file == META and member.size > _MAX_JSON:
            raise _refuse(bundle, f"member {name!r} is too large ({member.size} bytes)")
        return staging / "entries" / key / file
    found = _RECORD_RE.fullmatch(name)
    if found:
        shard, model, _ = found.groups()
        if shard != model[:2] or name not in manifest["records"] or member.size > _MAX_JSON:
            raise _refuse(bundle, f"member {name!r} is not a record its manifest lists")
        return staging / name
    raise _refuse(bundle, f"member {name!r} is not part of a cache's layout")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, bundle: Path) -> None:
    """Copy a member into a new private file of ours (never tarfile's extract: no modes, owners
    or links taken from the bundle)."""
    if not dest.parent.is_dir():
        dest.parent.mkdir(mode=0o700, parents=True)
    source = _reading(bundle, lambda: tar.extractfile(member))
    assert source is not None
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o600)
    written = 0
    with open(fd, "wb") as out:
        while True:
            chunk = _reading(bundle, lambda: source.read(_CHUNK))
            if not chunk:
                break
            written += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if written != member.size:
        raise _refuse(bundle, f"member {member.name!r} is truncated")


def _check_entries(
    cache: Cache, manifest: Mapping[str, Any], staging: Path, bundle: Path
) -> dict[str, Path]:
    """Each staged entry checked as the cache checks one, ready to be renamed into place."""
    ready = {}
    for key, listed in sorted(manifest["entries"].items()):
        staged = staging / "entries" / key
        os.utime(staging)
        if not (staged / META).is_file() or not (staged / BLOB).is_file():
            raise _refuse(bundle, f"it is incomplete: entry {key} lacks a file")
        entry, problem = inspect_entry(cache.root, staged, key, verify=True)
        if problem is not None or entry is None:
            raise _refuse(bundle, f"entry {key}: {problem.reason if problem else 'missing'}")
        if entry.meta["sha256"] != listed["sha256"] or entry.size != listed["size"]:
            raise _refuse(bundle, f"entry {key}: its manifest and meta.json disagree")
        write_new(staged / LAST_USED, b"")
        fsync_dir(staged)
        ready[key] = staged
    return ready


def _check_records(staged: Mapping[str, Path], bundle: Path) -> dict[str, Path]:
    for name, path in staged.items():
        key = name.rsplit("/", 1)[-1][: -len(".json")]
        if parse(read_json(path, _MAX_JSON), key) is None:
            raise _refuse(
                bundle,
                f"program record {name!r} is not a record of this key and format, or its sha256 "
                "does not match",
            )
    return dict(staged)


def _commit(cache: Cache, entries: Mapping[str, Path], records: Mapping[str, Path]) -> Imported:
    """Rename the checked entries, then the records, into place; undo them all on a failure."""
    placed: list[str] = []
    written: list[Path] = []
    present = 0
    try:
        for key, staged in entries.items():
            with cache._lock(key):
                here = cache._entry_dir(key)
                entry, problem = inspect_entry(cache.root, here, key, verify=False)
                if entry is not None:
                    present += 1  # the cache's own is kept; it is checked before every use
                    continue
                if problem is not None:
                    cache._discard(key, quarantine=problem.unsafe)
                cache.place(staged, key)
                placed.append(key)
        for name, staged_record in records.items():
            _, _, model, file = name.split("/")
            if cache.records.local(model, file[: -len(".json")]) is not None:
                continue
            final = cache.records.make_dir(model) / file
            os.replace(staged_record, final)
            written.append(final)
    except BaseException:
        for key in placed:
            with cache._lock(key):
                cache._discard(key, quarantine=False)
        for path in written:
            unlink(path)
        raise
    return Imported(len(placed), present, len(written))


__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST",
    "BundleError",
    "Exported",
    "Imported",
    "export_bundle",
    "import_bundle",
]
