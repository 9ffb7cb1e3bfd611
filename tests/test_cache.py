"""rkort.cache against real files and real processes: every failure it claims to survive."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import filelock
import platformdirs
import pytest

from rkort import cache as cache_mod
from rkort import files as files_mod
from rkort.cache import FORMAT_VERSION, Cache, CacheError, Entry, default_cache_dir, make_key
from rkort.cache import hashes as hashes_mod


def _probe(trial: Callable[[Path], None]) -> bool:
    with tempfile.TemporaryDirectory() as scratch:
        try:
            trial(Path(scratch))
        except OSError:
            return False
        finally:
            os.chmod(scratch, 0o700)
        return True


def _write_into_read_only_dir(scratch: Path) -> None:
    os.chmod(scratch, 0o500)
    (scratch / "f").touch()


def _give_away_a_file(scratch: Path) -> None:
    (scratch / "f").touch()
    os.chown(scratch / "f", 12345, 12345)


# Root with its usual capabilities writes through any mode and may chown; probe rather than
# assume, since containers often run as uid 0 with capabilities dropped.
MODES_BIND = hasattr(os, "geteuid") and not _probe(_write_into_read_only_dir)
CAN_CHOWN = hasattr(os, "chown") and _probe(_give_away_a_file)
KEY = make_key({"model": "tiny", "target": "rk3588"})
OTHER_KEY = make_key({"model": "tiny", "target": "rk3576"})
BLOB = b"RKNN" + bytes(range(256)) * 64

# Children import the very cache under test from this checkout.
CHILD_PRELUDE = textwrap.dedent(
    """
    import hashlib, importlib.util, json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    import rkort.cache as cache_mod
    """
)


def writer(
    data: bytes = BLOB, calls: Optional[list[Path]] = None, extra: Optional[dict] = None
) -> Callable[[Path], Optional[Mapping[str, Any]]]:
    def build(blob: Path) -> Optional[Mapping[str, Any]]:
        if calls is not None:
            calls.append(blob)
        blob.write_bytes(data)
        return extra

    return build


def files_under(path: Path) -> list[str]:
    return sorted(
        str((Path(d) / f).relative_to(path)) for d, _, files in os.walk(path) for f in files
    )


def run_child(script: str, *args: str, **popen: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD_PRELUDE + textwrap.dedent(script),
            str(Path(cache_mod.__file__).parents[2]),
            *args,
        ],
        **popen,
    )


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.01)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "rkort.cache" and r.levelno == logging.WARNING
    ]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cache(root: Path) -> Cache:
    return Cache(root)


@pytest.fixture
def built(cache: Cache) -> Entry:
    entry, was_built = cache.get_or_build(KEY, writer(), {"target": "rk3588"})
    assert was_built
    return entry


@pytest.fixture
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # Files in a test are seconds old at most; the racy-file rule is tested on its own below.
    monkeypatch.setattr(hashes_mod, "_RACY_WINDOW_S", 0.0)


@pytest.fixture
def hash_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    real = files_mod.sha256_file

    def counting(path: str) -> Any:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(files_mod, "sha256_file", counting)
    return reads


# -- keys --------------------------------------------------------------------------------------


def test_make_key_is_sha256_of_canonical_json() -> None:
    parts = {"b": [1, 32], "a": {"y": "int64", "x": 1.5}}
    canonical = '{"a":{"x":1.5,"y":"int64"},"b":[1,32],"format":' + str(FORMAT_VERSION) + "}"
    assert make_key(parts) == hashlib.sha256(canonical.encode()).hexdigest()
    assert make_key(parts) == make_key({"a": {"x": 1.5, "y": "int64"}, "b": [1, 32]})


def test_make_key_changes_with_every_part() -> None:
    variants = [
        {"shape": [1, 32], "dtype": "int64"},
        {"shape": [1, 64], "dtype": "int64"},
        {"shape": [32, 1], "dtype": "int64"},
        {"shape": [1, 32], "dtype": "int32"},
        {"shape": [1, 32], "dtype": "int64", "quant": None},
        {"shape": [1, 32], "dtype": "int64", "quant": False},
        {"shape": ["1", 32], "dtype": "int64"},
        {"shape": [1.0, 32], "dtype": "int64"},
        {"shape": [1, 32]},
    ]
    keys = [make_key(v) for v in variants]
    assert len(set(keys)) == len(keys)
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys)


def test_make_key_refuses_ambiguous_parts() -> None:
    with pytest.raises(ValueError, match="reserved"):
        make_key({"format": 2})
    with pytest.raises(TypeError):
        make_key({"path": Path("model.onnx")})
    with pytest.raises(ValueError):
        make_key({"scale": float("nan")})


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RKORT_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    assert Cache().root == tmp_path / "here"
    monkeypatch.delenv("RKORT_CACHE_DIR")
    assert default_cache_dir() == Path(platformdirs.user_cache_dir("rkort", appauthor=False))


def test_invalid_key_is_refused(cache: Cache) -> None:
    for bad in ["../../etc/passwd", KEY.upper(), KEY[:-1], ""]:
        with pytest.raises(ValueError, match="not a cache key"):
            cache.get(bad)
        with pytest.raises(ValueError, match="not a cache key"):
            cache.get_or_build(bad, writer(), {})


# -- round trip --------------------------------------------------------------------------------


def test_nothing_is_created_until_the_first_write(root: Path) -> None:
    cache = Cache(root)
    assert cache.get(KEY) is None
    assert cache.entries() == []
    assert cache.info() == {"root": str(root), "entries": 0, "bytes": 0}
    assert cache.clear() == 0
    assert cache.prune(max_bytes=0, max_age=0) == []
    assert not cache.remove(KEY)
    assert not root.exists()


def test_round_trip(cache: Cache, root: Path) -> None:
    calls: list[Path] = []
    entry, was_built = cache.get_or_build(
        KEY, writer(calls=calls, extra={"toolkit": "2.5.0"}), {"target": "rk3588"}
    )
    assert was_built and len(calls) == 1
    assert calls[0].parent.parent == root / "tmp"  # built beside the cache, renamed into place
    assert not entry.ephemeral
    assert entry.blob_path.read_bytes() == BLOB
    assert entry.size == len(BLOB)
    assert entry.meta == {
        "target": "rk3588",
        "toolkit": "2.5.0",
        "key": KEY,
        "format": FORMAT_VERSION,
        "sha256": hashlib.sha256(BLOB).hexdigest(),
        "size": len(BLOB),
        "created": entry.created,
    }
    assert json.loads((entry.dir / "meta.json").read_text()) == entry.meta
    assert entry.dir == root / f"v{FORMAT_VERSION}" / KEY[:2] / KEY

    again, was_built = Cache(root).get_or_build(KEY, writer(calls=calls), {"target": "rk3588"})
    assert not was_built and len(calls) == 1
    assert again.blob_path == entry.blob_path and again.meta == entry.meta
    assert Cache(root).get(KEY) is not None
    assert [e.key for e in cache.entries()] == [KEY]
    assert cache.info() == {"root": str(root), "entries": 1, "bytes": len(BLOB)}
    assert os.listdir(root / "tmp") == []


def test_cache_is_private(built: Entry, root: Path) -> None:
    assert root.stat().st_mode & 0o777 == 0o700
    for sub in ("v1", "tmp", "locks"):
        assert (root / sub).stat().st_mode & 0o077 == 0
    assert built.dir.stat().st_mode & 0o077 == 0
    assert built.blob_path.stat().st_mode & 0o777 == 0o600
    assert (built.dir / "meta.json").stat().st_mode & 0o777 == 0o600


def test_get_records_use_without_rewriting_the_blob(cache: Cache, built: Entry) -> None:
    marker = built.dir / "last_used"
    long_ago = time.time() - 10_000
    os.utime(marker, (long_ago, long_ago))
    blob_mtime = built.blob_path.stat().st_mtime_ns
    assert cache.entries()[0].last_used == pytest.approx(long_ago, abs=1)

    entry = cache.get(KEY)
    assert entry is not None
    assert entry.last_used > long_ago + 9_000
    assert marker.stat().st_mtime > long_ago + 9_000
    assert built.blob_path.stat().st_mtime_ns == blob_mtime


def test_meta_is_checked_before_building(cache: Cache, root: Path) -> None:
    calls: list[Path] = []
    with pytest.raises(ValueError, match="sha256"):
        cache.get_or_build(KEY, writer(calls=calls), {"sha256": "0" * 64})
    with pytest.raises(TypeError):
        cache.get_or_build(KEY, writer(calls=calls), {"path": Path("x")})
    assert calls == []
    with pytest.raises(ValueError, match="size"):
        cache.get_or_build(KEY, writer(extra={"size": 1}), {})
    assert cache.get(KEY) is None
    assert [f for f in files_under(root) if not f.startswith("locks/")] == []


# -- content hashes ----------------------------------------------------------------------------


@pytest.mark.usefixtures("no_racy_window")
def test_content_hash_is_memoized(
    cache: Cache, root: Path, tmp_path: Path, hash_reads: list[str]
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx" * 1000)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()

    assert cache.content_hash(model) == expected
    assert len(hash_reads) == 1
    assert cache.content_hash(model) == expected
    assert Cache(root).content_hash(str(model)) == expected  # the memo is on disk
    assert len(hash_reads) == 1
    assert len(os.listdir(root / "hashes")) == 1

    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cache.content_hash(model) == expected
    assert len(hash_reads) == 2

    model.write_bytes(b"ONNX" * 1000)  # same size, new bytes
    assert cache.content_hash(model) == hashlib.sha256(b"ONNX" * 1000).hexdigest()
    assert len(hash_reads) == 3

    # As `cp -p` or tar would: new bytes, same size, the old mtime put back; only ctime tells.
    st = model.stat()
    model.write_bytes(b"onnx" * 1000)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.content_hash(model) == expected
    assert len(hash_reads) == 4


@pytest.mark.usefixtures("no_racy_window")
def test_content_hash_follows_the_real_path(
    cache: Cache, tmp_path: Path, hash_reads: list[str]
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights")
    link = tmp_path / "link.onnx"
    link.symlink_to(model)
    assert cache.content_hash(link) == cache.content_hash(model)
    assert len(hash_reads) == 1


@pytest.mark.usefixtures("no_racy_window")
def test_content_hash_with_external_data(
    cache: Cache, tmp_path: Path, hash_reads: list[str]
) -> None:
    model, data_a, data_b = (tmp_path / n for n in ("m.onnx", "a.bin", "b.bin"))
    for path, content in ((model, b"graph"), (data_a, b"A" * 100), (data_b, b"B" * 100)):
        path.write_bytes(content)
    ab = cache.content_hash(model, [data_a, data_b])
    digests = [hashlib.sha256(c).digest() for c in (b"graph", b"A" * 100, b"B" * 100)]
    assert ab == hashlib.sha256(b"rkort-files\0" + b"".join(digests)).hexdigest()
    assert cache.content_hash(model, [data_b, data_a]) != ab
    assert cache.content_hash(model) != ab
    assert len(hash_reads) == 3
    data_b.write_bytes(b"b" * 100)
    assert cache.content_hash(model, [data_a, data_b]) != ab
    assert len(hash_reads) == 4


def test_content_hash_does_not_memoize_a_file_being_written(
    cache: Cache, tmp_path: Path, hash_reads: list[str]
) -> None:
    # A rewrite within one timestamp tick of the hash could keep every stat field, so a file
    # modified in the last seconds is hashed every time until it settles.
    model = tmp_path / "model.onnx"
    model.write_bytes(b"fresh")
    cache.content_hash(model)
    cache.content_hash(model)
    assert len(hash_reads) == 2


@pytest.mark.usefixtures("no_racy_window")
def test_content_hash_survives_garbage_memos(cache: Cache, root: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights")
    expected = hashlib.sha256(b"weights").hexdigest()
    cache.content_hash(model)
    (memo,) = (root / "hashes").iterdir()
    for garbage in (b"", b"{not json", b"[]", json.dumps({"stamp": 1, "sha256": "x"}).encode()):
        memo.write_bytes(garbage)
        assert Cache(root).content_hash(model) == expected
    with pytest.raises(FileNotFoundError):
        cache.content_hash(tmp_path / "missing.onnx")


def test_content_hash_without_a_usable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights")
    cache = Cache(blocker / "cache")
    assert cache.content_hash(model) == hashlib.sha256(b"weights").hexdigest()
    assert Cache.bytes_hash(b"weights") == hashlib.sha256(b"weights").hexdigest()


# -- corruption --------------------------------------------------------------------------------


def _truncate(e: Entry) -> None:
    e.blob_path.write_bytes(BLOB[:100])


def _flip_a_bit(e: Entry) -> None:
    data = bytearray(e.blob_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    e.blob_path.write_bytes(bytes(data))


def _rewrite_meta(**changes: Any) -> Callable[[Entry], None]:
    def damage(e: Entry) -> None:
        meta = json.loads((e.dir / "meta.json").read_text())
        meta.update(changes)
        (e.dir / "meta.json").write_text(json.dumps(meta))

    return damage


def _replace_with_file(e: Entry) -> None:
    shutil.rmtree(e.dir)
    e.dir.write_text("x")


DAMAGES: dict[str, tuple[Callable[[Entry], None], str]] = {
    "truncated blob": (_truncate, "100 bytes"),
    "bit-flipped blob": (_flip_a_bit, "sha256 does not match"),
    "missing blob": (lambda e: e.blob_path.unlink(), "blob is missing"),
    "missing meta": (lambda e: (e.dir / "meta.json").unlink(), "meta.json is missing"),
    "garbage meta": (lambda e: (e.dir / "meta.json").write_bytes(b"\x00{]"), "not valid JSON"),
    "meta not an object": (lambda e: (e.dir / "meta.json").write_text("[1]"), "not a JSON object"),
    "wrong format": (_rewrite_meta(format=FORMAT_VERSION + 1), "format"),
    "wrong key": (_rewrite_meta(key=OTHER_KEY), "names key"),
    "bad size": (_rewrite_meta(size="big"), "no valid size"),
    "entry is a file": (_replace_with_file, "not a directory"),
}


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_corrupt_entry_is_removed_and_rebuilt(
    damage: str, cache: Cache, built: Entry, caplog: pytest.LogCaptureFixture
) -> None:
    apply, reason = DAMAGES[damage]
    apply(built)
    caplog.set_level(logging.WARNING, logger="rkort.cache")

    assert cache.get(KEY) is None
    (message,) = warnings_of(caplog)
    assert KEY in message and reason in message and "removed" in message
    assert not os.path.lexists(built.dir)
    assert os.listdir(cache.root / "tmp") == []

    entry, was_built = cache.get_or_build(KEY, writer(), {"target": "rk3588"})
    assert was_built and entry.blob_path.read_bytes() == BLOB
    assert cache.get(KEY) is not None


def test_get_or_build_repairs_in_one_call(
    cache: Cache, built: Entry, caplog: pytest.LogCaptureFixture
) -> None:
    _flip_a_bit(built)
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    entry, was_built = cache.get_or_build(KEY, writer(), {"target": "rk3588"})
    assert was_built and entry.blob_path.read_bytes() == BLOB
    (message,) = warnings_of(caplog)
    assert KEY in message and "sha256" in message


def test_entries_skip_broken_ones_without_reading_blobs(cache: Cache, built: Entry) -> None:
    cache.get_or_build(OTHER_KEY, writer(b"other"), {})
    (built.dir / "meta.json").write_text("{")
    assert [e.key for e in cache.entries()] == [OTHER_KEY]
    (cache.root / "v1" / "zz").mkdir()
    (cache.root / "v1" / "zz" / "junk").mkdir()
    assert [e.key for e in cache.entries()] == [OTHER_KEY]


# -- failed and killed builds ------------------------------------------------------------------


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt(), OSError(28, "full")])
def test_a_failing_build_leaves_nothing(cache: Cache, root: Path, error: BaseException) -> None:
    def build(blob: Path) -> None:
        blob.write_bytes(BLOB[:10])
        raise error

    with pytest.raises(type(error)) as raised:
        cache.get_or_build(KEY, build, {})
    assert raised.value is error
    # The only trace is the key's 0-byte lock file: unlinking lock files would break flock.
    assert files_under(root) == [f"locks/{KEY}.lock"]
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "v1") == []
    assert cache.get(KEY) is None


def test_a_build_that_writes_no_blob_is_an_error(cache: Cache, root: Path) -> None:
    with pytest.raises(CacheError, match="without writing the blob"):
        cache.get_or_build(KEY, lambda blob: None, {})
    assert files_under(root) == [f"locks/{KEY}.lock"]


KILLED_BUILD = """
    root, key, marker = sys.argv[2:5]
    def build(blob):
        with open(blob, "wb") as f:
            f.write(b"partial" * 1000)
            f.flush()
            os.fsync(f.fileno())
        open(marker, "w").close()
        time.sleep(60)
    cache_mod.Cache(root).get_or_build(key, build, {})
"""


def test_a_killed_build_is_rebuilt_and_its_temp_dir_cleaned(
    cache: Cache, root: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "building"
    child = run_child(KILLED_BUILD, str(root), KEY, str(marker))
    try:
        wait_for(marker)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    (leftover,) = (root / "tmp").iterdir()
    assert leftover.name.startswith(KEY) and (leftover / "model.rknn").exists()
    assert cache.get(KEY) is None and cache.entries() == []

    # A young leftover of another key survives a build (its build may still be running)...
    young = root / "tmp" / f"{OTHER_KEY}.young"
    young.mkdir()
    entry, was_built = cache.get_or_build(KEY, writer(), {})
    assert was_built and entry.blob_path.read_bytes() == BLOB
    # ...but one of the key being built goes at once: holding its lock proves its build is dead.
    assert not leftover.exists() and young.exists()

    long_ago = time.time() - 3600
    os.utime(young, (long_ago, long_ago))
    cache.remove(KEY)
    cache.get_or_build(KEY, writer(), {})
    assert os.listdir(root / "tmp") == []


def test_the_temp_dir_of_a_running_build_is_kept(cache: Cache, root: Path) -> None:
    cache.get_or_build(KEY, writer(), {})
    running = root / "tmp" / f"{OTHER_KEY}.inprogress"
    running.mkdir()
    long_ago = time.time() - 3600
    os.utime(running, (long_ago, long_ago))
    # A separate lock object, as another process would hold it.
    holder = filelock.FileLock(str(root / "locks" / f"{OTHER_KEY}.lock"))
    with holder:
        cache.remove(KEY)
        cache.get_or_build(KEY, writer(), {})
        assert running.exists()
    cache.remove(KEY)
    cache.get_or_build(KEY, writer(), {})
    assert not running.exists()


# -- concurrency -------------------------------------------------------------------------------


RACING_BUILD = """
    root, key, ready, go, count = sys.argv[2:7]
    def build(blob):
        with open(count, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(0.3)
        blob.write_bytes(os.urandom(1 << 16))  # two builds could never agree on these bytes
        return {"pid": os.getpid()}
    cache = cache_mod.Cache(root)
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.002)
    entry, built = cache.get_or_build(key, build, {"m": 1})
    data = entry.blob_path.read_bytes()
    print(json.dumps({"built": built, "ephemeral": entry.ephemeral,
                      "sha256": hashlib.sha256(data).hexdigest(), "meta": entry.meta["sha256"]}))
"""


def test_racing_processes_build_once(root: Path, tmp_path: Path) -> None:
    go, count = tmp_path / "go", tmp_path / "count"
    children = [
        run_child(
            RACING_BUILD,
            str(root),
            KEY,
            str(tmp_path / f"ready{i}"),
            str(go),
            str(count),
            stdout=subprocess.PIPE,
        )
        for i in range(8)
    ]
    try:
        for i in range(8):
            wait_for(tmp_path / f"ready{i}")
        go.touch()
        outputs = [c.communicate(timeout=60)[0] for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    assert [c.returncode for c in children] == [0] * 8
    results = [json.loads(out) for out in outputs]
    assert len(count.read_text().splitlines()) == 1
    assert sum(r["built"] for r in results) == 1
    assert not any(r["ephemeral"] for r in results)
    assert len({r["sha256"] for r in results} | {r["meta"] for r in results}) == 1
    assert os.listdir(root / "tmp") == []


def test_racing_threads_build_once(cache: Cache, root: Path) -> None:
    calls: list[Path] = []

    def slow_build(blob: Path) -> None:
        calls.append(blob)
        time.sleep(0.2)
        blob.write_bytes(os.urandom(1000))

    results: list[tuple[Entry, bool]] = []
    caches = [cache, cache, Cache(root), Cache(root)]
    threads = [
        threading.Thread(target=lambda c=c: results.append(c.get_or_build(KEY, slow_build, {})))
        for c in caches
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(calls) == 1 and len(results) == 4
    assert sum(built for _, built in results) == 1
    assert len({e.blob_path.read_bytes() for e, _ in results}) == 1


def _build_in_forked_child(cache: Cache, key: str, results: Any) -> None:
    entry, was_built = cache.get_or_build(key, writer(), {})
    results.put((was_built, entry.blob_path.read_bytes() == BLOB))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_cache_inherited_across_fork_keeps_working(cache: Cache) -> None:
    cache.get_or_build(KEY, writer(), {})  # the parent has used its lock objects
    cache.remove(KEY)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_build_in_forked_child, args=(cache, KEY, results))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    assert results.get(timeout=5) == (True, True)
    assert cache.get(KEY) is not None


# -- unusable roots ----------------------------------------------------------------------------


@pytest.fixture(params=["under a file", "read-only parent"])
def unusable_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "under a file":
        blocker = tmp_path / "afile"
        blocker.write_text("not a directory")
        yield blocker / "cache"
        assert blocker.read_text() == "not a directory"
        return
    if not MODES_BIND:
        pytest.skip("this user writes through chmod 0o500; covered by 'under a file'")
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    try:
        yield parent / "cache"
    finally:
        parent.chmod(0o700)
    assert os.listdir(parent) == []


def test_unusable_root_builds_ephemeral_entries(
    unusable_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    cache = Cache(unusable_root)
    entries = []
    for data in (BLOB, b"second"):
        entry, was_built = cache.get_or_build(KEY, writer(data, extra={"x": 1}), {"m": 1})
        entries.append(entry)
        assert was_built and entry.ephemeral
        assert entry.blob_path.read_bytes() == data
        assert entry.meta["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry.meta["x"] == 1 and entry.meta["m"] == 1
        assert unusable_root not in entry.dir.parents
        assert entry.dir.stat().st_mode & 0o077 == 0
    assert entries[0].dir != entries[1].dir
    (message,) = warnings_of(caplog)  # one per root and process, however many builds
    assert str(unusable_root) in message and "RKORT_CACHE_DIR" in message
    assert cache.get(KEY) is None
    for entry in entries:
        shutil.rmtree(entry.dir)


def test_a_failing_ephemeral_build_leaves_nothing(unusable_root: Path) -> None:
    made: list[Path] = []

    def build(blob: Path) -> None:
        made.append(blob.parent)
        blob.write_bytes(b"partial")
        raise RuntimeError("toolkit crashed")

    with pytest.raises(RuntimeError, match="toolkit crashed"):
        Cache(unusable_root).get_or_build(KEY, build, {})
    assert made and not made[0].exists()


def test_a_root_that_fails_after_the_build_keeps_the_blob(
    cache: Cache, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rkort.cache")

    def build_then_break_the_root(blob: Path) -> None:
        blob.write_bytes(BLOB)
        os.rmdir(root / "v1")
        (root / "v1").write_text("the disk filled up, say")

    entry, was_built = cache.get_or_build(KEY, build_then_break_the_root, {})
    assert was_built and entry.ephemeral
    assert entry.blob_path.read_bytes() == BLOB
    assert len(warnings_of(caplog)) == 1
    assert os.listdir(root / "tmp") == []
    assert files_under(root) == [f"locks/{KEY}.lock", "v1"]
    shutil.rmtree(entry.dir)


@pytest.mark.skipif(not MODES_BIND, reason="this user writes through any mode")
def test_a_read_only_cache_still_serves_its_entries(
    cache: Cache, built: Entry, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    for d in (built.dir, built.dir.parent, root / "v1", root / "locks", root):
        d.chmod(0o500)
    try:
        entry, was_built = Cache(root).get_or_build(KEY, writer(b"never"), {})
    finally:
        for d in (root, root / "locks", root / "v1", built.dir.parent, built.dir):
            d.chmod(0o700)
    assert not was_built and not entry.ephemeral
    assert entry.blob_path.read_bytes() == BLOB
    assert warnings_of(caplog) == []


# -- security ----------------------------------------------------------------------------------


def test_a_shared_writable_root_is_refused(root: Path) -> None:
    root.mkdir(mode=0o700)
    root.chmod(0o777)
    with pytest.raises(CacheError, match="writable by group or others"):
        Cache(root)
    root.chmod(0o700)
    cache = Cache(root)
    root.chmod(0o770)  # made unsafe after the Cache was opened
    with pytest.raises(CacheError, match="writable by group or others"):
        cache.get(KEY)
    with pytest.raises(CacheError):
        cache.get_or_build(KEY, writer(), {})
    with pytest.raises(CacheError):
        cache.content_hash(__file__)


@pytest.mark.skipif(not CAN_CHOWN, reason="needs the right to chown")
def test_a_root_owned_by_someone_else_is_refused(root: Path) -> None:
    root.mkdir(mode=0o700)
    os.chown(root, 12345, 12345)
    with pytest.raises(CacheError, match="owned by uid 12345"):
        Cache(root)


def test_a_symlinked_entry_is_refused(
    built: Entry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    other_root = tmp_path / "other"
    other = Cache(other_root)
    other.get_or_build(OTHER_KEY, writer(), {})  # creates the layout
    planted = other_root / "v1" / KEY[:2] / KEY
    planted.parent.mkdir(mode=0o700, exist_ok=True)
    planted.symlink_to(built.dir, target_is_directory=True)

    assert other.get(KEY) is None
    (message,) = warnings_of(caplog)
    assert KEY in message and "symlink" in message and "quarantine" in message
    assert not os.path.lexists(planted)
    assert [p.is_symlink() for p in (other_root / "quarantine").iterdir()] == [True]
    assert built.blob_path.read_bytes() == BLOB  # the link's target is untouched

    entry, was_built = other.get_or_build(KEY, writer(b"own"), {})
    assert was_built and entry.blob_path.read_bytes() == b"own"
    assert other.clear() == 2 and os.listdir(other_root / "quarantine") == []
    assert built.blob_path.read_bytes() == BLOB


def test_a_symlinked_blob_is_refused(
    cache: Cache, built: Entry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    outside = tmp_path / "outside.rknn"
    outside.write_bytes(BLOB)  # even with the right bytes
    built.blob_path.unlink()
    built.blob_path.symlink_to(outside)
    assert cache.get(KEY) is None
    assert "blob is a symlink" in warnings_of(caplog)[0]
    assert outside.read_bytes() == BLOB


def test_an_entry_reached_through_a_symlinked_shard_is_refused(
    cache: Cache, built: Entry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    shard = built.dir.parent
    elsewhere = tmp_path / "elsewhere"
    shard.rename(elsewhere)
    shard.symlink_to(elsewhere, target_is_directory=True)
    assert cache.get(KEY) is None
    assert "outside the cache root" in warnings_of(caplog)[0]
    assert not (elsewhere / KEY).exists()  # moved to quarantine, not deleted
    assert len(os.listdir(cache.root / "quarantine")) == 1


@pytest.mark.skipif(not CAN_CHOWN, reason="needs the right to chown")
def test_an_entry_owned_by_someone_else_is_refused(
    cache: Cache, built: Entry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    os.chown(built.blob_path, 12345, 12345)
    assert cache.get(KEY) is None
    assert "owned by uid 12345" in warnings_of(caplog)[0]
    entry, was_built = cache.get_or_build(KEY, writer(), {})
    assert was_built
    os.chown(entry.dir, 12345, 12345)
    assert cache.get(KEY) is None
    assert "entry directory is owned by uid 12345" in warnings_of(caplog)[1]


# -- removal -----------------------------------------------------------------------------------


def test_remove_and_clear(cache: Cache, built: Entry, root: Path) -> None:
    cache.get_or_build(OTHER_KEY, writer(), {})
    assert cache.remove(KEY)
    assert not cache.remove(KEY)
    assert cache.get(KEY) is None and not built.dir.exists()
    cache.get_or_build(KEY, writer(), {})
    assert cache.clear() == 2
    assert cache.entries() == [] and cache.info()["bytes"] == 0
    assert [f for f in files_under(root) if not f.startswith("locks/")] == []


def _aged(cache: Cache, key: str, size: int, age: float) -> Entry:
    entry, _ = cache.get_or_build(key, writer(b"x" * size), {})
    when = time.time() - age
    os.utime(entry.dir / "last_used", (when, when))
    return entry


def test_prune_by_age_then_size(cache: Cache) -> None:
    keys = [make_key({"n": i}) for i in range(4)]
    for key, age in zip(keys, (1000, 500, 100, 10)):
        _aged(cache, key, 100, age)
    assert cache.prune() == []
    assert [e.key for e in cache.prune(max_age=300)] == keys[:2]
    assert {e.key for e in cache.entries()} == set(keys[2:])
    assert [e.key for e in cache.prune(max_bytes=150)] == [keys[2]]
    assert [e.key for e in cache.entries()] == [keys[3]]
    assert cache.prune(max_bytes=100) == []
    assert [e.key for e in cache.prune(max_bytes=0)] == [keys[3]]
    with pytest.raises(ValueError):
        cache.prune(max_bytes=-1)


def test_get_keeps_a_used_entry_from_being_pruned(cache: Cache) -> None:
    old, new = make_key({"n": "old"}), make_key({"n": "new"})
    _aged(cache, old, 100, 1000)
    _aged(cache, new, 100, 500)
    assert cache.get(old) is not None
    assert [e.key for e in cache.prune(max_bytes=100)] == [new]
