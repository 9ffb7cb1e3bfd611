"""Compile once for a fleet: bundles carried from a build host to boards (`rkort cache export` and
`import`), and a shared remote cache, on a real S3-compatible server (moto's, on 127.0.0.1, as
s3fs's own tests use) and on a file:// directory.

Every session here is real (the simulator on this host, or the board rehearsal); every blob is
compiled by rknn-toolkit2.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnxruntime as ort
import pytest

import rkort
from rkort.cache import FORMAT_VERSION, Cache, make_key
from tests import models
from tests.conftest import RKNN, needs_rknn

pytestmark = needs_rknn

BUCKET = "fleet"
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
REMOTE_VARS = (
    "RKORT_REMOTE_CACHE",
    "RKORT_REMOTE_WRITE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def figure(text: str) -> None:
    print(f"[figure] {text}")


# -- the S3 server ------------------------------------------------------------------------------


class _Requests(logging.Handler):
    """The request lines moto's server (werkzeug) logs: method, path, status."""

    PATTERN = re.compile(r'(GET|HEAD|PUT|POST|DELETE) (/\S+) HTTP/[^"]*" (\d{3})')

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = self.PATTERN.search(record.getMessage())
        if found:
            self.seen.append((found[1], found[2].split("?")[0], int(found[3])))


class S3:
    """moto's S3 server on 127.0.0.1 with one bucket, and what it was asked."""

    def __init__(self, endpoint: str, requests: _Requests) -> None:
        self.endpoint = endpoint
        self.requests = requests

    @property
    def env(self) -> dict[str, str]:
        return {**AWS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(
            key=AWS["AWS_ACCESS_KEY_ID"],
            secret=AWS["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    def downloads(self, prefix: str) -> dict[str, int]:
        """Successful GETs of each object under ``prefix``, by its path after the prefix."""
        counts: dict[str, int] = {}
        start = f"/{BUCKET}/{prefix}/"
        for method, path, status in self.requests.seen:
            if method == "GET" and status == 200 and path.startswith(start):
                counts[path[len(start) :]] = counts.get(path[len(start) :], 0) + 1
        return counts


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    import boto3
    from moto.server import ThreadedMotoServer

    requests = _Requests()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.INFO)
    werkzeug.addHandler(requests)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_keys()).create_bucket(
        Bucket=BUCKET
    )
    try:
        yield S3(endpoint, requests)
    finally:
        server.stop()
        werkzeug.removeHandler(requests)


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
    }


@pytest.fixture
def remote_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[Mapping[str, str]], None]:
    """Set environment variables for this test only (the remote's, the AWS ones)."""
    for name in REMOTE_VARS:
        monkeypatch.delenv(name, raising=False)

    def apply(values: Mapping[str, str]) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return apply


# -- models, commands, sessions -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> models.TestModel:
    return models.mlp(tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> models.TestModel:
    return models.conv_relu(tmp_path_factory.mktemp("conv"))


def child_env(cache: Path, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in REMOTE_VARS}
    env.pop("RKORT_BOARD", None)
    env["RKORT_CACHE_DIR"] = str(cache)
    env.update(extra or {})
    return env


def cli(
    *args: str, cache: Path, env: Optional[Mapping[str, str]] = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rkort", *args],
        capture_output=True,
        text=True,
        env=child_env(cache, env),
        timeout=600,
    )


def warm(model: models.TestModel, cache: Path, env: Optional[Mapping[str, str]] = None) -> str:
    done = cli("warmup", str(model.path), "-q", cache=cache, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def session(model: models.TestModel, cache: Path, **options: str) -> Any:
    return rkort.InferenceSession(
        str(model.path),
        providers=[(RKNN, {"cache_dir": str(cache), **options}), "CPUExecutionProvider"],
    )


def check_outputs(model: models.TestModel, sess: Any) -> None:
    feed = dict(zip(model.input_names, model.make_feed(0)))
    want = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"]).run(None, feed)
    got = sess.run(None, feed)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-2, atol=2e-2)


def entry_dirs(cache: Path) -> list[Path]:
    layout = cache / f"v{FORMAT_VERSION}"
    return sorted(p for p in layout.glob("*/*") if p.is_dir()) if layout.is_dir() else []


def check_cache(cache: Path) -> list[str]:
    """The keys of a cache whose every entry and record is complete and checks out, and that holds
    no partial file anywhere."""
    keys = []
    for entry in entry_dirs(cache):
        meta = json.loads((entry / "meta.json").read_text())
        blob = (entry / "model.rknn").read_bytes()
        assert len(blob) == meta["size"] and hashlib.sha256(blob).hexdigest() == meta["sha256"]
        keys.append(entry.name)
    for record in (cache / "programs").glob("*/*/*"):
        data = json.loads(record.read_text())
        canonical = json.dumps(data["body"], sort_keys=True, separators=(",", ":"))
        assert hashlib.sha256(canonical.encode()).hexdigest() == data["sha256"], record
    partial = [p for p in cache.rglob("*") if p.name.endswith(".part") or ".tmp-" in p.name]
    assert partial == []
    return keys


def snapshot(cache: Path) -> dict[str, tuple[int, str]]:
    """Every file of a cache but its locks and last-use stamps: mode and content hash."""
    found = {}
    for path in sorted(cache.rglob("*")) if cache.exists() else []:
        rel = path.relative_to(cache).as_posix()
        if path.is_file() and not rel.startswith("locks/") and path.name != "last_used":
            found[rel] = (path.stat().st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


# -- the remote cache ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(s3: S3, mlp: models.TestModel, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The prefix a warmup published mlp's blob and record to (`rkort warmup` with
    RKORT_REMOTE_CACHE and RKORT_REMOTE_WRITE=1)."""
    cache = tmp_path_factory.mktemp("builder") / "cache"
    env = {**s3.env, "RKORT_REMOTE_CACHE": f"s3://{BUCKET}/published", "RKORT_REMOTE_WRITE": "1"}
    assert "1 compiled" in warm(mlp, cache, env)
    return "published"


def copy_prefix(s3: S3, source: str, dest: str) -> list[str]:
    fs = s3.fs()
    names = sorted(fs.find(f"{BUCKET}/{source}"))
    for name in names:
        fs.copy(name, name.replace(f"{BUCKET}/{source}/", f"{BUCKET}/{dest}/", 1))
    return [n.split(f"{BUCKET}/{source}/", 1)[1] for n in names]


def test_a_warmup_publishes_and_an_empty_cache_fetches_instead_of_compiling(
    s3: S3,
    published: str,
    mlp: models.TestModel,
    tmp_path: Path,
    remote_env: Callable[[Mapping[str, str]], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    objects = sorted(s3.fs().find(f"{BUCKET}/{published}"))
    rel = [o.split(f"{published}/", 1)[1] for o in objects]
    blobs = [r for r in rel if r.endswith("/model.rknn")]
    assert len(blobs) == 1 and re.fullmatch(r"v1/[0-9a-f]{2}/[0-9a-f]{64}/model\.rknn", blobs[0])
    assert blobs[0].replace("model.rknn", "meta.json") in rel
    assert any(
        re.fullmatch(r"programs/[0-9a-f]{2}/[0-9a-f]{64}/[0-9a-f]{64}\.json", r) for r in rel
    )
    assert not any(r.endswith(".part") for r in rel)

    remote_env(s3.env)
    caplog.set_level(logging.INFO, logger="rkort.cache")
    started = time.perf_counter()
    sess = session(mlp, tmp_path / "board", remote_cache=f"s3://{BUCKET}/{published}")
    opened = time.perf_counter() - started
    stats = rkort.session_stats(sess)
    assert stats["compiles"] == 0
    assert sess.get_providers()[0] == RKNN and stats["providers"][0] == RKNN
    check_outputs(mlp, sess)
    assert any("fetched cache entry" in r.getMessage() for r in caplog.records)
    assert len(check_cache(tmp_path / "board")) == 1
    figure(
        f"an empty cache fetched mlp's blob from S3 instead of compiling: 0 compiles, {opened:.2f} s"
    )


SESSION_APP = """
import json, os, sys, time
import numpy as np
import rkort

model, cache, go = sys.argv[1], sys.argv[2], sys.argv[3]
while not os.path.exists(go):
    time.sleep(0.01)
sess = rkort.InferenceSession(
    model, providers=[("RKNNExecutionProvider", {"cache_dir": cache}), "CPUExecutionProvider"]
)
x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
y = sess.run(None, {"x": x})[0]
print(json.dumps({"stats": rkort.session_stats(sess), "y": y.tolist()}))
"""


def test_eight_processes_download_each_object_once(
    s3: S3, published: str, mlp: models.TestModel, tmp_path: Path
) -> None:
    """8 processes open mlp at once against one empty local cache and a remote that has it: each
    remote object is downloaded once, the 8 sessions compile nothing, nothing partial is left."""
    objects = copy_prefix(s3, published, "eight")
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(SESSION_APP))
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = child_env(cache, {**s3.env, "RKORT_REMOTE_CACHE": f"s3://{BUCKET}/eight"})
    procs = [
        subprocess.Popen(
            [sys.executable, str(app), str(mlp.path), str(cache), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(8)
    ]
    time.sleep(1.0)
    go.touch()
    started = time.perf_counter()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    took = time.perf_counter() - started
    assert [r["stats"]["compiles"] for r in results] == [0] * 8
    assert all(r["stats"]["providers"][0] == RKNN for r in results)
    assert all(r["y"] == results[0]["y"] for r in results)
    downloads = s3.downloads("eight")
    assert downloads == {name: 1 for name in objects}, downloads
    assert check_cache(cache) and os.listdir(cache / "tmp") == []
    figure(
        f"8 processes, one empty cache, {len(objects)} remote objects: each downloaded once "
        f"({sum(downloads.values())} GETs in all), 0 compiles, {took:.1f} s"
    )


@pytest.fixture(scope="module")
def file_remote(mlp: models.TestModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file:// remote a warmup published mlp to."""
    base = tmp_path_factory.mktemp("file-remote")
    remote = base / "remote"
    env = {"RKORT_REMOTE_CACHE": remote.as_uri(), "RKORT_REMOTE_WRITE": "1"}
    assert "1 compiled" in warm(mlp, base / "cache", env)
    return remote


BOARD_APP = """
import json, sys
import numpy as np
import onnxruntime as ort

model, out = sys.argv[1], sys.argv[2]
sess = ort.InferenceSession(model)
x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
np.save(out + ".npy", sess.run(None, {"x": x})[0])
import rkort
with open(out + ".json", "w") as f:
    json.dump(rkort.session_stats(sess), f)
"""


def rehearse(
    model: models.TestModel, cache: Path, tmp_path: Path, env: Optional[Mapping[str, str]] = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`rkort run --board rk3588 -- python app.py` (see tests/test_board.py): rkort's board path,
    blobs from the cache only, the converter out of reach."""
    app = tmp_path / "board_app.py"
    app.write_text(textwrap.dedent(BOARD_APP))
    out = tmp_path / "out"
    done = cli(
        "run", "--board", "rk3588", "--", sys.executable, str(app), str(model.path), str(out),
        cache=cache, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stats = json.loads(out.with_suffix(".json").read_text())
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    want = ort.InferenceSession(str(model.path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(out.with_suffix(".npy")), want, rtol=2e-2, atol=2e-2)
    return done, stats


def test_a_board_with_an_empty_cache_runs_from_a_file_remote(
    file_remote: Path, mlp: models.TestModel, tmp_path: Path
) -> None:
    done, stats = rehearse(
        mlp, tmp_path / "board", tmp_path, {"RKORT_REMOTE_CACHE": file_remote.as_uri()}
    )
    assert stats["compiles"] == 0 and stats["blobs_loaded"] == 1
    assert stats["npu_calls"] == 1 and stats["cpu_calls"] == 0
    assert "0 compile(s), 1 blob(s) loaded" in done.stderr
    assert len(check_cache(tmp_path / "board")) == 1


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def https_like(file_remote: Path) -> Iterator[str]:
    """The file remote served read-only over plain HTTP on 127.0.0.1 (what an https:// remote
    in front of a bucket or a directory is to rkort)."""
    handler = functools.partial(_Quiet, directory=str(file_remote))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


def test_a_board_runs_from_a_read_only_http_remote(
    https_like: str, mlp: models.TestModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"RKORT_REMOTE_CACHE": https_like, "RKORT_REMOTE_WRITE": "1"}
    done, stats = rehearse(mlp, tmp_path / "board", tmp_path, env)
    assert stats["compiles"] == 0 and stats["blobs_loaded"] == 1 and stats["npu_calls"] == 1, (
        done.stderr
    )
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    cache = Cache(tmp_path / "writer", remote=https_like + "/", remote_write=True)
    for n in range(2):
        assert cache.records.put("ab" * 32, make_key({"n": n}), {"parts": []})
    warned = [r.getMessage() for r in caplog.records if "remote cache" in r.getMessage()]
    assert len(warned) == 1 and "read-only" in warned[0], warned


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def _meta_format(data: bytes) -> bytes:
    meta = json.loads(data)
    meta["format"] = FORMAT_VERSION + 1
    return json.dumps(meta).encode()


def _record_body(data: bytes) -> bytes:
    record = json.loads(data)
    record["body"]["notes"] = ["tampered"]
    return json.dumps(record).encode()


TAMPER: dict[str, tuple[str, Callable[[bytes], bytes], str]] = {
    "truncated blob": ("model.rknn", lambda d: d[: len(d) // 2], "bytes, "),
    "one bit of the blob": ("model.rknn", _flip, "sha256 does not match"),
    "meta.json of another format": ("meta.json", _meta_format, "has format"),
    "a record's body": (".json", _record_body, "sha256 does not match"),
}


@pytest.mark.parametrize("what", sorted(TAMPER))
def test_a_tampered_file_remote_object_is_never_used(
    what: str,
    file_remote: Path,
    mlp: models.TestModel,
    tmp_path: Path,
    remote_env: Callable[[Mapping[str, str]], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    suffix, damage, reason = TAMPER[what]
    remote = tmp_path / "remote"
    shutil.copytree(file_remote, remote)
    pick = "programs" if what == "a record's body" else f"v{FORMAT_VERSION}"
    (target,) = [p for p in (remote / pick).rglob(f"*{suffix}") if _not_a_face(p)]
    target.write_bytes(damage(target.read_bytes()))
    caplog.set_level(logging.INFO, logger="rkort.cache")
    sess = session(mlp, tmp_path / "cache", remote_cache=remote.as_uri())
    check_outputs(mlp, sess)
    refused = [r.getMessage() for r in caplog.records if "is refused" in r.getMessage()]
    assert len(refused) == 1 and reason in refused[0], refused
    assert rkort.session_stats(sess)["compiles"] == (0 if pick == "programs" else 1)
    assert len(check_cache(tmp_path / "cache")) == 1  # built here (or fetched intact), never used
    local = json.loads(next((tmp_path / "cache" / "programs").rglob("*.json")).read_text())
    assert local["body"].get("notes") != ["tampered"]


def test_a_truncated_s3_object_is_detected_and_republished(
    s3: S3,
    published: str,
    mlp: models.TestModel,
    tmp_path: Path,
    remote_env: Callable[[Mapping[str, str]], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A blob cut short on S3 is refused; the session compiles here, and with remote_write it
    publishes the good one in its place."""
    objects = copy_prefix(s3, published, "truncated")
    fs = s3.fs()
    (blob,) = [f"{BUCKET}/truncated/{o}" for o in objects if o.endswith("model.rknn")]
    good = fs.cat_file(blob)
    fs.pipe_file(blob, good[: len(good) - 100])
    remote_env(s3.env)
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    sess = session(
        mlp, tmp_path / "cache", remote_cache=f"s3://{BUCKET}/truncated", remote_write="1"
    )
    check_outputs(mlp, sess)
    assert rkort.session_stats(sess)["compiles"] == 1
    refused = [r.getMessage() for r in caplog.records if "is refused" in r.getMessage()]
    assert len(refused) == 1 and f"{len(good) - 100} bytes" in refused[0]
    (key,) = check_cache(tmp_path / "cache")
    meta = json.loads(fs.cat_file(blob.replace("model.rknn", "meta.json")))
    assert hashlib.sha256(fs.cat_file(blob)).hexdigest() == meta["sha256"]  # healed
    assert meta["key"] == key


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_remote_that_is_down_never_fails_a_session(
    mlp: models.TestModel,
    tmp_path: Path,
    remote_env: Callable[[Mapping[str, str]], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    remote_env({**AWS, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{_closed_port()}"})
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    started = time.perf_counter()
    sess = session(mlp, tmp_path / "cache", remote_cache=f"s3://{BUCKET}/down", remote_write="1")
    opened = time.perf_counter() - started
    check_outputs(mlp, sess)
    stats = rkort.session_stats(sess)
    assert stats["compiles"] == 1 and stats["providers"][0] == RKNN
    failed = [r.getMessage() for r in caplog.records if "remote cache" in r.getMessage()]
    assert len(failed) == 1 and "using the local cache only" in failed[0], failed
    # A second session in this process does not wait for the dead remote again.
    started = time.perf_counter()
    again = session(mlp, tmp_path / "cache", remote_cache=f"s3://{BUCKET}/down")
    reopened = time.perf_counter() - started
    assert rkort.session_stats(again)["compiles"] == 0
    figure(
        f"remote down: session opened in {opened:.1f} s (one warning), the next in {reopened:.1f} s"
    )


def test_an_unreadable_file_remote_is_a_miss_with_one_warning(
    mlp: models.TestModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote = tmp_path / "remote"
    remote.write_text("not a directory")
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    sess = session(mlp, tmp_path / "cache", remote_cache=remote.as_uri(), remote_write="1")
    check_outputs(mlp, sess)
    assert rkort.session_stats(sess)["compiles"] == 1
    failed = [r.getMessage() for r in caplog.records if "remote cache" in r.getMessage()]
    assert len(failed) == 1, failed


# -- bundles ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warmed(
    mlp: models.TestModel, conv: models.TestModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    cache = tmp_path_factory.mktemp("warmed") / "cache"
    warm(mlp, cache)
    warm(conv, cache)
    return cache


@pytest.fixture(scope="module")
def bundle(warmed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "fleet.tar"
    done = cli("cache", "export", str(out), cache=warmed)
    assert done.returncode == 0, done.stderr
    assert "exported 2 entries" in done.stdout and "2 program record(s)" in done.stdout
    return out


def test_export_then_import_into_an_empty_cache_serves_a_board(
    bundle: Path, warmed: Path, mlp: models.TestModel, tmp_path: Path
) -> None:
    board = tmp_path / "board"
    started = time.perf_counter()
    done = cli("cache", "import", str(bundle), cache=board)
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert "imported 2 entries (0 already here) and 2 program record(s)" in done.stdout
    assert sorted(check_cache(board)) == sorted(check_cache(warmed))
    uid = os.getuid()
    for path in [board, *board.rglob("*")]:
        st = path.lstat()
        if path.parent.name == "locks":
            continue
        assert st.st_uid == uid
        assert oct(st.st_mode & 0o777) == oct(0o700 if path.is_dir() else 0o600), path
    for entry in entry_dirs(board):  # meta.json as the build host wrote it
        assert (entry / "meta.json").read_bytes() == (
            warmed / entry.relative_to(board) / "meta.json"
        ).read_bytes()
    assert os.listdir(board / "tmp") == []
    again = cli("cache", "import", str(bundle), cache=board)
    assert "imported 0 entries (2 already here)" in again.stdout
    listed = cli("cache", "list", cache=board)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 2
    _, stats = rehearse(mlp, board, tmp_path)
    assert stats["compiles"] == 0 and stats["blobs_loaded"] == 1 and stats["npu_calls"] == 1
    figure(f"bundle of 2 entries ({bundle.stat().st_size} bytes) imported in {took:.2f} s")


def test_export_filters_by_target_and_model(
    warmed: Path, mlp: models.TestModel, tmp_path: Path
) -> None:
    out = tmp_path / "out.tar.gz"
    none = cli("cache", "export", str(out), "--target", "rk3576", cache=warmed)
    assert none.returncode == 1 and "holds no entry for rk3576" in none.stderr
    assert not out.exists()
    for model in (str(mlp.path), "mlp.onnx"):
        done = cli(
            "cache", "export", str(out), "--model", model, "--target", "rk3588", cache=warmed
        )
        assert done.returncode == 0, done.stderr
        assert "exported 1 entry" in done.stdout and "1 program record(s)" in done.stdout
    model_hash = next((warmed / "programs").glob("*/*")).name
    by_hash = cli("cache", "export", str(out), "--model", model_hash[:16], cache=warmed)
    assert by_hash.returncode == 0 and "exported 1 entry" in by_hash.stdout
    with tarfile.open(out) as tar:
        assert tar.getnames()[0] == "rkort-bundle.json"
        assert all(m.isreg() and m.mode == 0o600 and m.uid == 0 for m in tar.getmembers())
    nothing = cli("cache", "export", cache=warmed)
    assert nothing.returncode == 2 and "needs a bundle path" in nothing.stderr


def _members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(bundle) as tar:
        found = []
        for member in tar.getmembers():
            stream = tar.extractfile(member)
            found.append((member, stream.read() if stream else b""))
        return found


def _write(out: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(out, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out


def _change(pattern: str, edit: Callable[[bytes], bytes]) -> Callable[[list[Any]], list[Any]]:
    def apply(members: list[Any]) -> list[Any]:
        hits = [i for i, (m, _) in enumerate(members) if re.search(pattern, m.name)]
        info, data = members[hits[-1]]
        members[hits[-1]] = (info, edit(data))
        return members

    return apply


def _add(info: tarfile.TarInfo, data: bytes = b"") -> Callable[[list[Any]], list[Any]]:
    return lambda members: [*members, (info, data)]


def _special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _manifest(edit: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        manifest = json.loads(data)
        edit(manifest)
        return json.dumps(manifest).encode()

    return apply


def _wrong_key(data: bytes) -> bytes:
    meta = json.loads(data)
    meta["key"] = "0" * 64
    return json.dumps(meta).encode()


BAD_BUNDLES: dict[str, tuple[Callable[[list[Any]], list[Any]], str]] = {
    "path traversal": (
        _add(tarfile.TarInfo("v1/../../escaped.txt"), b"x"),
        "would be written outside the cache",
    ),
    "absolute path": (_add(tarfile.TarInfo("/tmp/escaped.txt"), b"x"), "outside the cache"),
    "symlink": (_add(_special("v1/ab/link", tarfile.SYMTYPE, "/etc/passwd")), "symbolic link"),
    "hardlink": (_add(_special("v1/ab/hard", tarfile.LNKTYPE, "rkort-bundle.json")), "hard link"),
    "device": (_add(_special("v1/ab/dev", tarfile.CHRTYPE)), "device, FIFO"),
    "fifo": (_add(_special("v1/ab/fifo", tarfile.FIFOTYPE)), "device, FIFO"),
    "a member outside the layout": (_add(tarfile.TarInfo("notes.txt"), b"x"), "not part of"),
    "a flipped bit in the last blob": (
        _change(r"model\.rknn$", _flip),
        "the blob's sha256 does not match meta.json",
    ),
    "a truncated blob": (_change(r"model\.rknn$", lambda d: d[:-10]), "were recorded"),
    "a tampered record": (_change(r"^programs/", _record_body), "sha256 does not match"),
    "a foreign bundle format": (
        _change(r"rkort-bundle\.json", _manifest(lambda m: m.update(bundle_format=2))),
        "foreign format (bundle_format 2",
    ),
    "a foreign cache format": (
        _change(r"rkort-bundle\.json", _manifest(lambda m: m.update(cache_format=2))),
        "foreign format (cache_format 2",
    ),
    "a member of another cache format": (
        _add(tarfile.TarInfo(f"v2/ab/{'ab' * 32}/meta.json"), b"{}"),
        "is of cache format 2",
    ),
    "meta.json naming another key": (_change(r"meta\.json$", _wrong_key), "names key"),
    "meta.json of another format": (_change(r"meta\.json$", _meta_format), "has format 2"),
}


@pytest.mark.parametrize("what", sorted(BAD_BUNDLES))
def test_a_bad_bundle_is_refused_and_the_cache_is_unchanged(
    what: str, bundle: Path, mlp: models.TestModel, warmed: Path, tmp_path: Path
) -> None:
    edit, message = BAD_BUNDLES[what]
    cache = tmp_path / "cache"
    one = tmp_path / "one.tar"
    assert cli("cache", "export", str(one), "--model", str(mlp.path), cache=warmed).returncode == 0
    assert cli("cache", "import", str(one), cache=cache).returncode == 0
    before = snapshot(cache)
    bad = _write(tmp_path / "bad.tar", edit(_members(bundle)))
    done = cli("cache", "import", str(bad), cache=cache)
    assert done.returncode == 1, done.stdout
    assert message in done.stderr and "nothing was imported" in done.stderr, done.stderr
    assert snapshot(cache) == before
    assert os.listdir(cache / "tmp") == []
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/escaped.txt").exists()


def test_a_truncated_or_foreign_file_is_refused(bundle: Path, tmp_path: Path) -> None:
    data = bundle.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * 2 // 3])
    done = cli("cache", "import", str(cut), cache=tmp_path / "cache")
    assert done.returncode == 1 and "truncated or damaged" in done.stderr, done.stderr
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x89PNG" + os.urandom(4000))
    done = cli("cache", "import", str(junk), cache=tmp_path / "cache")
    assert done.returncode == 1 and "cannot be read as a tar file" in done.stderr, done.stderr
    assert snapshot(tmp_path / "cache") == {}


KILLED_IMPORT = """
import os, signal, sys
from rkort.cache import Cache, import_bundle

kill_at, root, bundle = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cache = Cache(root)
steps = []

def arm(name, fn):
    def step(*args, **kwargs):
        steps.append(name)
        if len(steps) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return step

for name in ("mkdir", "rename", "replace", "fsync", "utime"):
    setattr(os, name, arm(name, getattr(os, name)))
done = import_bundle(cache, bundle)
print("STEPS", len(steps), done.entries, done.present, done.records, " ".join(steps))
"""


def test_an_import_killed_at_every_step_leaves_no_partial_entry(
    bundle: Path, mlp: models.TestModel, warmed: Path, tmp_path: Path
) -> None:
    """SIGKILL before each file-system step of an import (two entries, one already in the
    cache): killed before the renames, the cache is as it was; killed among them, it holds
    complete entries only; the next import always completes and sweeps what the killed left."""
    base = tmp_path / "base"
    one = tmp_path / "one.tar"
    assert cli("cache", "export", str(one), "--model", str(mlp.path), cache=warmed).returncode == 0
    assert cli("cache", "import", str(one), cache=base).returncode == 0
    before = snapshot(base)
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILLED_IMPORT))

    def run(k: int, cache: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), str(k), str(cache), str(bundle)],
            capture_output=True,
            text=True,
            env=child_env(cache),
            timeout=300,
        )

    clean = tmp_path / "clean"
    shutil.copytree(base, clean)
    full = run(10**9, clean)
    assert full.returncode == 0, full.stderr
    _, total, entries, present, records, *steps = full.stdout.split()
    assert (entries, present, records) == ("1", "1", "1")
    assert "rename" in steps and "replace" in steps
    unchanged = complete = 0
    for k in range(1, int(total) + 1):
        cache = tmp_path / f"k{k}"
        shutil.copytree(base, cache)
        killed = run(k, cache)
        assert killed.returncode == -signal.SIGKILL, (k, killed.stderr)
        keys = check_cache(cache)  # complete, checked entries and records only
        after = {p: v for p, v in snapshot(cache).items() if not p.startswith("tmp/")}
        if after == before:
            unchanged += 1
        else:
            assert len(keys) == 2, k  # the new entry, complete and checked
            complete += 1
        finish = cli("cache", "import", str(bundle), cache=cache)
        assert finish.returncode == 0, finish.stderr
        assert len(check_cache(cache)) == 2 and os.listdir(cache / "tmp") == []
        shutil.rmtree(cache)
    assert unchanged > 0 and complete > 0
    figure(
        f"import SIGKILLed before each of its {total} write steps ({' '.join(steps)}): "
        f"{unchanged} left the cache as it was, {complete} (from the entry's rename on) left "
        "it with the new entry complete; never a partial entry; every next import completed"
    )


def _not_a_face(path: Path) -> bool:
    """Program records sit beside the model's face record (rkort.face); tamper with the former."""
    if path.suffix != ".json" or "programs" not in path.parts:
        return True
    return "parts" in json.loads(path.read_text())["body"]
