"""Issue 5, end to end: the session and the CLI survive concurrency, crashes, a damaged, full or
read-only cache, and a hostile one. Every test goes through rkort.InferenceSession or `rkort
warmup`, as a user would; figures are printed as ``[figure] ...`` (see them with ``-s``)."""

from __future__ import annotations

import ast
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import rkort
from rkort.cache import FORMAT_VERSION, Cache
from rkort.capi.onnxruntime_pybind11_state import EPFail
from rkort.toolkit import process as _worker
from tests import helpers_reliability as h
from tests import models
from tests.conftest import RKNN, needs_rknn

TOOLKIT = rkort.parts.runtime_version()


def figure(text: str) -> None:
    print(f"[figure] {text}")


def cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "rkort.cache" and r.levelno >= logging.WARNING
    ]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> models.TestModel:
    return models.mlp(tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def mlp_feed(mlp: models.TestModel) -> dict[str, np.ndarray]:
    return dict(zip(mlp.input_names, mlp.make_feed(0)))


@pytest.fixture(scope="module")
def mlp_expected(mlp: models.TestModel, mlp_feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(mlp.path)).run(None, mlp_feed)[0]


def rknn_session(model: Path, cache: Path, **options: str) -> rkort.InferenceSession:
    return rkort.InferenceSession(
        model, providers=[(RKNN, {"cache_dir": str(cache), **options}), "CPUExecutionProvider"]
    )


def warmup(model: Path, cache: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rkort",
        "warmup",
        str(model),
        "-q",
        "--cache-dir",
        str(cache),
        *args,
    ]


# =============================================================================================
# 1. Concurrency


OPEN_AT_ONCE = """
    import json, logging, os, sys, time
    import numpy as np
    import rkort

    model, ready, go = sys.argv[1:4]
    seen = []

    class Seen(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.getLogger("rkort")
    log.addHandler(Seen())
    log.setLevel(logging.INFO)
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    started = time.monotonic()
    session = rkort.InferenceSession(model, providers=["RKNNExecutionProvider"])
    opened = time.monotonic() - started
    x = np.linspace(-2, 2, 32, dtype=np.float32).reshape(2, 16)
    out = session.run(None, {"x": x})[0]
    print(json.dumps({
        "compiled": sum(m.startswith("compiled ") for m in seen),
        "cached": sum(m.startswith("using cached blob") for m in seen),
        "providers": session.get_providers(),
        "out": out.tolist(),
        "opened": opened,
    }))
"""


@needs_rknn
def test_eight_processes_open_one_new_model_and_compile_it_once(
    mlp: models.TestModel, tmp_path: Path
) -> None:
    n = 8
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = h.child_env(RKORT_CACHE_DIR=str(cache))
    script = textwrap.dedent(OPEN_AT_ONCE)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(mlp.path), str(tmp_path / f"ready{i}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(n)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
            assert time.monotonic() < deadline, "the children did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        started = time.monotonic()
        go.touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            results.append(h.last_json(out))
        wall = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sum(r["compiled"] for r in results) == 1
    assert sum(r["cached"] for r in results) == n - 1
    assert all(r["providers"][0] == RKNN for r in results)
    assert all(r["out"] == results[0]["out"] for r in results), "the processes disagree"
    x = np.linspace(-2, 2, 32, dtype=np.float32).reshape(2, 16)
    expected = ort.InferenceSession(str(mlp.path)).run(None, {"x": x})[0]
    assert cos(np.array(results[0]["out"], np.float32), expected) >= 0.9999
    (entry,) = h.entry_dirs(cache)
    h.check_entry(entry)
    assert os.listdir(cache / "tmp") == []
    opened = sorted(r["opened"] for r in results)
    figure(
        f"{n} processes opened one new model at once: 1 compile into the cache, {n - 1} cache "
        f"hits, {n} identical outputs; session open {opened[0]:.1f}-{opened[-1]:.1f} s, "
        f"all done in {wall:.1f} s"
    )


@needs_rknn
def test_eight_warmups_at_once_compile_once(mlp: models.TestModel, tmp_path: Path) -> None:
    n = 8
    cache, scratch = tmp_path / "cache", tmp_path / "scratch"
    scratch.mkdir()
    env = h.child_env(TMPDIR=str(scratch))
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            warmup(mlp.path, cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    wall = time.monotonic() - started
    assert [p.returncode for p in procs] == [0] * n, [e for _, e in outs]
    summaries = sorted(out.strip().splitlines()[-1] for out, _ in outs)
    assert summaries == ["0 compiled, 1 already in the cache"] * (n - 1) + [
        "1 compiled, 0 already in the cache"
    ]
    assert all("Traceback" not in err for _, err in outs)
    (entry,) = h.entry_dirs(cache)
    h.check_entry(entry)
    assert os.listdir(scratch) == [], "the toolkit's temporary files must not outlive a warmup"
    figure(
        f"{n} concurrent `rkort warmup`s of one model: 1 compiled, {n - 1} found it; {wall:.1f} s"
    )


@needs_rknn
def test_eight_threads_share_one_rknn_session_one_call_at_a_time(
    mlp: models.TestModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = rknn_session(mlp.path, tmp_path / "cache")
    assert session.get_providers()[0] == RKNN
    feeds = [dict(zip(mlp.input_names, mlp.make_feed(seed))) for seed in range(8)]
    serial = [session.run(None, f)[0] for f in feeds]

    # Count, per worker, the calls in flight: the RKNN context lives in the worker, and two
    # calls at once on it would be the bug (the socket is one stream, the context one context).
    in_flight: dict[int, int] = {}
    most: dict[int, int] = {}
    calls = [0]
    guard = threading.Lock()
    real_call = _worker.WorkerProcess.call

    def counting_call(self: _worker.WorkerProcess, arrays: Any) -> list[Any]:
        with guard:
            in_flight[id(self)] = in_flight.get(id(self), 0) + 1
            most[id(self)] = max(most.get(id(self), 0), in_flight[id(self)])
            calls[0] += 1
        try:
            time.sleep(0.001)  # widen the window in which a second call could slip in
            return real_call(self, arrays)
        finally:
            with guard:
                in_flight[id(self)] -= 1

    monkeypatch.setattr(_worker.WorkerProcess, "call", counting_call)
    rounds = 25
    mismatches: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                k = (i + r) % 8
                if not np.array_equal(session.run(None, feeds[k])[0], serial[k]):
                    mismatches.append((i, r))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wall = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), "a run() hung"
    assert not errors, errors
    assert not mismatches, f"{len(mismatches)} results differ from the serial ones"
    assert calls[0] == 8 * rounds
    assert most and max(most.values()) == 1, most
    figure(
        f"8 threads x {rounds} run()s on one RKNN session: {calls[0]} results bitwise equal to "
        f"serial, at most {max(most.values())} call in flight per RKNN context; {wall:.2f} s"
    )


# =============================================================================================
# 2. Crash safety


def _assert_no_bad_entry_visible(cache: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every entry on disk is complete and verified; rkort's check had nothing to repair."""
    caplog.clear()
    keys = []
    for entry in h.entry_dirs(cache):
        h.check_entry(entry)
        assert Cache(cache).get(entry.name) is not None
        keys.append(entry.name)
    assert cache_warnings(caplog) == [], "a partial or corrupt entry was in place"
    return keys


@needs_rknn
def test_warmup_killed_at_random_points_never_leaves_a_usable_partial_entry(
    mlp: models.TestModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    cache, scratch = tmp_path / "cache", tmp_path / "scratch"
    scratch.mkdir()
    # The workers' temporary directories land in `scratch`, to see that orphans clean up.
    env = h.child_env(TMPDIR=str(scratch))
    # How long one warmup takes here, so that the kills spread over all of it.
    times = []
    for _ in range(2):  # the second, with warm disk caches, is the typical one
        started = time.monotonic()
        first = subprocess.run(warmup(mlp.path, cache), capture_output=True, env=env, timeout=300)
        assert first.returncode == 0, first.stderr
        times.append(time.monotonic() - started)
        Cache(cache).remove(h.only_key(cache))
    took = times[-1]
    span = 1.2 * took  # a few land after the end
    rng = random.Random(20260501)
    kills, finished, found_complete, removed = 0, 0, 0, 0
    stages = {"before the build": 0, "during the build": 0, "after the commit": 0, "reading": 0}

    def builds() -> set[str]:
        tmp = cache / "tmp"
        names = os.listdir(tmp) if tmp.is_dir() else []
        return {n for n in names if ".removed-" not in n}

    for _ in range(20):
        had_entry, old_builds = bool(h.entry_dirs(cache)), builds()
        proc = subprocess.Popen(
            warmup(mlp.path, cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        time.sleep(rng.uniform(0.0, span))
        if proc.poll() is None:
            proc.kill()
            kills += 1
            now = builds()
            if had_entry:
                stages["reading"] += 1
            elif h.entry_dirs(cache):
                stages["after the commit"] += 1
            elif now != old_builds:  # it made its build directory, or swept old ones
                stages["during the build"] += 1
            else:
                stages["before the build"] += 1
        else:
            finished += 1
            assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        proc.wait(timeout=60)
        keys = _assert_no_bad_entry_visible(cache, caplog)
        found_complete += bool(keys)
        # Usually take the entry away again, so that the next warmup compiles (and is killed
        # while compiling or writing) rather than finding it.
        if keys and rng.random() < 0.85:
            assert Cache(cache).remove(keys[0])
            removed += 1
    final = subprocess.run(
        warmup(mlp.path, cache), capture_output=True, text=True, env=env, timeout=300
    )
    assert final.returncode == 0, final.stderr
    assert "compiled" in final.stdout
    (entry,) = h.entry_dirs(cache)
    meta = h.check_entry(entry)
    assert meta["toolkit"] == TOOLKIT
    if "1 compiled" not in final.stdout:  # it found the entry: make it rebuild once more
        Cache(cache).remove(entry.name)
        again = subprocess.run(
            warmup(mlp.path, cache), capture_output=True, text=True, env=env, timeout=300
        )
        assert "1 compiled" in again.stdout, again.stderr
    assert os.listdir(cache / "tmp") == [], "a rebuild sweeps what killed builds of its key left"
    # Orphaned toolkit workers notice their parent is gone, remove their directories and exit.
    deadline = time.monotonic() + 30
    while os.listdir(scratch) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.listdir(scratch) == [], os.listdir(scratch)
    figure(
        f"`rkort warmup` started 20 times against one cache and SIGKILLed at a random point of "
        f"its {took:.1f} s: {kills} killed ({', '.join(f'{n} {k}' for k, n in stages.items())}), "
        f"{finished} finished first; after each, 0 partial or corrupt entries in place (a "
        f"complete one {found_complete} times, taken away {removed} times to force rebuilds); "
        "every warmup that ran to the end succeeded; no leftovers in the cache or the temp dir"
    )


CRASH_AT_STEP = """
    import os, shutil, signal, sys
    import rkort.compiler

    kill_at = int(sys.argv[1])
    steps = []
    armed = [False]

    def arm(name, fn):
        def step(*args, **kwargs):
            if armed[0]:
                steps.append(name)
                if len(steps) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return step

    real_place = rkort.compiler.place_file

    def place(src, dest):  # the compile is done: from here on, every write step is a kill point
        armed[0] = True
        return real_place(src, dest)

    rkort.compiler.place_file = place
    for name in ("mkdir", "rename", "replace", "write", "fchmod", "fsync", "unlink", "rmdir", "utime"):
        setattr(os, name, arm(name, getattr(os, name)))
    shutil.copyfile = arm("copyfile", shutil.copyfile)
    from rkort.cli import main

    code = main(sys.argv[2:])
    armed[0] = False
    print("STEPS " + " ".join(steps))
    sys.exit(code)
"""


@needs_rknn
def test_warmup_killed_at_every_write_step_of_a_cache_entry(
    mlp: models.TestModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL injected before each file-system step from the end of the compile to the entry's
    last fsync: two chains, each killing a new warmup one step later on one cache."""
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    script = textwrap.dedent(CRASH_AT_STEP)
    env = h.child_env()
    chains = [tmp_path / "odd", tmp_path / "even"]

    def start(cache: Path, k: int) -> subprocess.Popen[str]:
        args = warmup(mlp.path, cache)[3:]
        return subprocess.Popen(
            [sys.executable, "-c", script, str(k), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    killed_at: list[int] = []
    completed: list[list[str]] = []  # the steps of each run that got past its kill point
    k = 1
    done = [False, False]
    while not all(done):
        running = []
        for chain, cache in enumerate(chains):
            if not done[chain]:
                for entry in h.entry_dirs(cache):  # a committed entry would be found, not built
                    Cache(cache).remove(entry.name)
                running.append((chain, cache, k + chain, start(cache, k + chain)))
        for chain, cache, step, proc in running:
            out, err = proc.communicate(timeout=300)
            if proc.returncode == -signal.SIGKILL:
                killed_at.append(step)
            else:
                assert proc.returncode == 0, err
                assert "1 compiled" in out
                completed.append(out.split("STEPS ", 1)[1].split())
                done[chain] = True
            _assert_no_bad_entry_visible(cache, caplog)
        k += 2
    total_steps = min(completed, key=len)
    assert set(range(1, len(total_steps) + 1)) <= set(killed_at)
    for cache in chains:
        (entry,) = h.entry_dirs(cache)
        h.check_entry(entry)
        assert os.listdir(cache / "tmp") == []
    figure(
        f"SIGKILL before each of the {len(total_steps)} write steps of a cache entry "
        f"({' '.join(total_steps)}): 0 partial entries in place, every next warmup completed"
    )


@pytest.fixture(scope="module")
def rk2118_w8a8(tmp_path_factory: pytest.TempPathFactory) -> tuple[models.TestModel, Path]:
    """A Conv model and a calibration dataset: a w8a8 build for rk2118 aborts the converter."""
    d = tmp_path_factory.mktemp("abort")
    m = models.conv_relu(d)
    for i in range(2):
        np.save(d / f"sample{i}.npy", m.make_feed(i)[0])
    dataset = d / "dataset.txt"
    dataset.write_text("sample0.npy\nsample1.npy\n")
    return m, dataset


@needs_rknn
def test_a_converter_abort_becomes_a_cpu_fallback_or_ep_fail(
    rk2118_w8a8: tuple[models.TestModel, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m, dataset = rk2118_w8a8
    cache = tmp_path / "cache"
    options = {"target": "rk2118", "dtype": "w8a8", "dataset": str(dataset)}
    caplog.set_level(logging.WARNING, logger="rkort")
    session = rknn_session(m.path, cache, **options)
    assert session.get_providers() == ["CPUExecutionProvider"]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "rkort"]
    assert "falling back" in warning and "SIGABRT" in warning
    feed = dict(zip(m.input_names, m.make_feed(0)))
    expected = ort.InferenceSession(str(m.path)).run(None, feed)[0]
    np.testing.assert_array_equal(session.run(None, feed)[0], expected)

    with pytest.raises(EPFail, match="SIGABRT"):
        rknn_session(m.path, cache, fallback="0", **options)
    assert h.entry_dirs(cache) == [] and os.listdir(cache / "tmp") == []

    cli = subprocess.run(
        warmup(m.path, cache, "--target", "rk2118", "--dtype", "w8a8", "--dataset", str(dataset)),
        capture_output=True,
        text=True,
        env=h.child_env(),
        timeout=300,
    )
    assert cli.returncode == 1 and "SIGABRT" in cli.stderr and "Traceback" not in cli.stderr
    assert h.entry_dirs(cache) == []
    figure(
        "a converter killed by SIGABRT: CPU fallback with 1 warning, EPFail with fallback=0, "
        "`rkort warmup` exits 1 with the reason; the user's process lives, nothing cached"
    )


@needs_rknn
def test_a_simulator_worker_killed_mid_session_falls_back_like_onnxruntime(
    mlp: models.TestModel,
    mlp_feed: dict[str, np.ndarray],
    mlp_expected: np.ndarray,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = {id(w) for w in _live_workers()}
    session = rknn_session(mlp.path, tmp_path / "cache")
    assert session.get_providers()[0] == RKNN
    session.run(None, mlp_feed)
    workers = [w for w in _live_workers() if id(w) not in before and w.proc.poll() is None]
    assert workers
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)
        w.proc.wait(timeout=30)
    caplog.set_level(logging.WARNING, logger="rkort")
    # As onnxruntime does when an execution provider fails in run(): warn, fall back, retry.
    out = session.run(None, mlp_feed)[0]
    np.testing.assert_array_equal(out, mlp_expected)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert any(r.levelno == logging.WARNING for r in caplog.records)


@needs_rknn
def test_a_runner_tells_a_refused_input_from_a_dead_worker(tmp_path: Path) -> None:
    """What the session needs to answer as onnxruntime does: RunnerError for one call the
    runtime refused (the runner still works), RunnerDied once its worker is gone."""
    from rkort.backends import RunnerDied, RunnerError
    from rkort.backends.simulator import open_simulator
    from rkort.compiler import BuildSpec

    path = h.ids_model(tmp_path)
    spec = BuildSpec(
        str(path),
        ("ids", "mask"),
        ((1, 6), (1, 6)),
        ("int64", "int64"),
        ("hidden", "pooled"),
        ((1, 6, 8), (1, 8)),
        ("float32", "float32"),
    )
    good = [np.arange(6, dtype=np.int64).reshape(1, 6), np.ones((1, 6), np.int64)]
    with open_simulator(spec, progress=False) as runner:
        expected = runner.run(good)
        bad = [good[0].copy(), good[1]]
        bad[0][0, 0] = 64  # one past the vocabulary
        with pytest.raises(RunnerError) as refused:
            runner.run(bad)
        assert not isinstance(refused.value, RunnerDied)
        for a, b in zip(runner.run(good), expected):
            np.testing.assert_array_equal(a, b)
        os.kill(runner.pid, signal.SIGKILL)
        for _ in range(2):
            with pytest.raises(RunnerDied, match="SIGKILL"):
                runner.run(good)


def _live_workers() -> list[_worker.WorkerProcess]:
    import gc

    return [o for o in gc.get_objects() if isinstance(o, _worker.WorkerProcess)]


# =============================================================================================
# 3. Corruption, through the session


def _truncate(entry: Path) -> None:
    blob = entry / "model.rknn"
    blob.write_bytes(blob.read_bytes()[:1000])


def _flip_a_bit(entry: Path) -> None:
    blob = entry / "model.rknn"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x10
    blob.write_bytes(bytes(data))


def _rewrite_meta(**changes: Any) -> Any:
    def damage(entry: Path) -> None:
        meta = json.loads((entry / "meta.json").read_text())
        meta.update(changes)
        (entry / "meta.json").write_text(json.dumps(meta))

    return damage


DAMAGES = {
    "truncated blob": (_truncate, "bytes, "),
    "bit-flipped blob": (_flip_a_bit, "sha256 does not match"),
    "missing meta.json": (lambda e: (e / "meta.json").unlink(), "meta.json is missing"),
    "another toolkit version": (_rewrite_meta(toolkit="2.3.0"), "toolkit '2.3.0'"),
    "another format": (_rewrite_meta(format=FORMAT_VERSION + 1), "format"),
}


@pytest.fixture(scope="module")
def pristine_cache(mlp: models.TestModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("pristine") / "cache"
    if RKNN in rkort.get_available_providers():
        rknn_session(mlp.path, cache)
    return cache


def _copy_cache(pristine: Path, dest: Path) -> Path:
    shutil.copytree(pristine, dest, symlinks=True)
    return dest


@needs_rknn
@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_a_damaged_entry_is_detected_removed_and_rebuilt_by_a_new_session(
    damage: str,
    mlp: models.TestModel,
    mlp_feed: dict[str, np.ndarray],
    mlp_expected: np.ndarray,
    pristine_cache: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = _copy_cache(pristine_cache, tmp_path / "cache")
    (entry,) = h.entry_dirs(cache)
    before = h.check_entry(entry)
    apply, reason = DAMAGES[damage]
    apply(entry)
    caplog.set_level(logging.INFO, logger="rkort")

    session = rknn_session(mlp.path, cache)

    (warning,) = cache_warnings(caplog)
    assert entry.name in warning and reason in warning and "it will be rebuilt" in warning
    assert any(r.getMessage().startswith("compiled ") for r in caplog.records)
    assert session.get_providers()[0] == RKNN
    assert cos(session.run(None, mlp_feed)[0], mlp_expected) >= 0.9999
    (repaired,) = h.entry_dirs(cache)
    after = h.check_entry(repaired)
    assert after["created"] > before["created"]
    assert after["toolkit"] == TOOLKIT and after["format"] == FORMAT_VERSION
    assert h.rknn_trailer(repaired / "model.rknn")["version"] == TOOLKIT
    assert os.listdir(cache / "tmp") == []


@needs_rknn
def test_warmup_repairs_a_damaged_entry(
    mlp: models.TestModel, pristine_cache: Path, tmp_path: Path
) -> None:
    cache = _copy_cache(pristine_cache, tmp_path / "cache")
    (entry,) = h.entry_dirs(cache)
    _flip_a_bit(entry)
    p = subprocess.run(warmup(mlp.path, cache), capture_output=True, text=True, env=h.child_env())
    assert p.returncode == 0, p.stderr
    assert "1 compiled" in p.stdout
    assert "sha256 does not match" in p.stderr and "rebuilt" in p.stderr
    (entry,) = h.entry_dirs(cache)
    h.check_entry(entry)


# =============================================================================================
# 4. Full disk, read-only disk, no disk


FULL_DISK_SESSION = """
    import json, logging, os, sys
    import numpy as np
    import rkort

    model, cache = sys.argv[1:3]
    seen = []

    class Seen(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    logging.getLogger("rkort").addHandler(Seen())
    x = np.linspace(-2, 2, 32, dtype=np.float32).reshape(2, 16)
    outs, providers = [], []
    for _ in range(2):  # a second session in the same process: no second warning
        s = rkort.InferenceSession(model, providers=[("RKNNExecutionProvider", {"cache_dir": cache})])
        providers.append(s.get_providers()[0])
        outs.append(s.run(None, {"x": x})[0].tolist())
        del s
    files = sorted(os.path.relpath(os.path.join(d, f), cache)
                   for d, _, fs in os.walk(cache) for f in fs if not d.endswith("locks"))
    print(json.dumps({"warnings": seen, "providers": providers, "out": outs, "files": files,
                      "tmp": sorted(os.listdir(os.environ["TMPDIR"]))}))
"""


needs_tmpfs = pytest.mark.skipif(
    not h.can_mount_tmpfs(), reason="cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)"
)


def _expected_for_linspace(mlp: models.TestModel) -> np.ndarray:
    x = np.linspace(-2, 2, 32, dtype=np.float32).reshape(2, 16)
    return ort.InferenceSession(str(mlp.path)).run(None, {"x": x})[0]


@needs_rknn
@needs_tmpfs
def test_a_full_disk_under_the_cache_costs_one_warning_and_leaves_nothing(
    mlp: models.TestModel, tmp_path: Path
) -> None:
    """A real ENOSPC: the cache lives on a 4 KiB tmpfs and the blob is 20 KiB."""
    mnt, scratch = tmp_path / "mnt", tmp_path / "scratch"
    mnt.mkdir()
    scratch.mkdir()
    cache = mnt / "cache"
    cmd = h.in_tmpfs(
        mnt,
        "4k",
        [sys.executable, "-c", textwrap.dedent(FULL_DISK_SESSION), str(mlp.path), str(cache)],
    )
    p = subprocess.run(
        cmd, capture_output=True, text=True, env=h.child_env(TMPDIR=str(scratch)), timeout=300
    )
    assert p.returncode == 0, p.stderr
    r = h.last_json(p.stdout)
    (warning,) = r["warnings"]
    assert "No space left on device" in warning and "RKORT_CACHE_DIR" in warning
    assert r["providers"] == [RKNN, RKNN]
    for out in r["out"]:
        assert cos(np.array(out, np.float32), _expected_for_linspace(mlp)) >= 0.9999
    # Only the model-hash memo, a small file written atomically, may be there.
    assert [f for f in r["files"] if not f.startswith("hashes/")] == [], "partial files left"
    assert r["tmp"] == [], "the blobs kept in temporary directories are removed"
    figure(
        "cache on a full disk (4 KiB tmpfs, real ENOSPC): sessions run on RKNN, 1 warning "
        "per process, no file left in the cache or the temp dir"
    )


READ_ONLY_SESSIONS = """
    import json, logging, os, sys
    import numpy as np
    import rkort

    warm, new, cache = sys.argv[1:4]
    seen = []

    class Seen(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    logging.getLogger("rkort").addHandler(Seen())
    result = {}
    for name, model in (("warm", warm), ("new", new)):
        s = rkort.InferenceSession(model, providers=[("RKNNExecutionProvider", {"cache_dir": cache})])
        feed = {i.name: np.ones(i.shape, np.float32) for i in s.get_inputs()}
        result[name] = {"provider": s.get_providers()[0], "out": s.run(None, feed)[0].tolist(),
                        "warnings": list(seen)}
        del seen[:]
    print(json.dumps(result))
"""


@needs_rknn
@needs_tmpfs
def test_a_read_only_cache_serves_its_entries_and_compiles_new_ones_elsewhere(
    mlp: models.TestModel, tmp_path: Path
) -> None:
    """A real EROFS: a tmpfs warmed, then remounted read-only (root cannot write through it)."""
    other = models.conv_relu(tmp_path)
    mnt, scratch = tmp_path / "mnt", tmp_path / "scratch"
    mnt.mkdir()
    scratch.mkdir()
    cache = mnt / "cache"
    warm = f"{sys.executable} -m rkort warmup {mlp.path} -q --cache-dir {cache} >/dev/null &&"
    cmd = h.in_tmpfs(
        mnt,
        "64m",
        [
            sys.executable,
            "-c",
            textwrap.dedent(READ_ONLY_SESSIONS),
            str(mlp.path),
            str(other.path),
            str(cache),
        ],
        after=f"{warm} mount -o remount,ro {mnt} &&",
    )
    p = subprocess.run(
        cmd, capture_output=True, text=True, env=h.child_env(TMPDIR=str(scratch)), timeout=300
    )
    assert p.returncode == 0, p.stderr
    r = h.last_json(p.stdout)
    assert r["warm"]["provider"] == RKNN and r["warm"]["warnings"] == []
    assert r["new"]["provider"] == RKNN
    (warning,) = r["new"]["warnings"]
    assert "Read-only file system" in warning
    feed = {"image": np.ones(other.input_shapes[0], np.float32)}
    expected = ort.InferenceSession(str(other.path)).run(None, feed)[0]
    assert cos(np.array(r["new"]["out"], np.float32), expected) >= 0.9999
    assert os.listdir(scratch) == []
    figure(
        "read-only cache (tmpfs remounted ro, real EROFS): cached model used with no warning, "
        "a new model compiled in a temp dir with 1 warning, both on RKNN"
    )


@needs_rknn
def test_a_cache_dir_under_a_regular_file_costs_one_warning(
    mlp: models.TestModel,
    mlp_feed: dict[str, np.ndarray],
    mlp_expected: np.ndarray,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Root ignores permission bits, so the portable unwritable directory is one under a file."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    caplog.set_level(logging.WARNING, logger="rkort")
    for _ in range(2):
        session = rknn_session(mlp.path, blocker / "cache")
        assert session.get_providers()[0] == RKNN
        assert cos(session.run(None, mlp_feed)[0], mlp_expected) >= 0.9999
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(blocker / "cache") in warning and "Not a directory" in warning
    assert blocker.read_text() == "not a directory"


# =============================================================================================
# 6. Security of the cache


@needs_rknn
def test_the_cache_root_is_private_whatever_the_umask(
    mlp: models.TestModel, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    old = os.umask(0)
    try:
        rknn_session(mlp.path, cache)
    finally:
        os.umask(old)
    for d, _, files in os.walk(cache):
        assert os.stat(d).st_mode & 0o777 == 0o700, d
        for f in files:
            if not d.endswith("locks"):
                assert os.stat(os.path.join(d, f)).st_mode & 0o077 == 0, f


def _symlinked_entry(cache: Path, entry: Path, outside: Path) -> Path:
    shutil.copytree(entry, outside)  # a sound entry, checksum and all
    shutil.rmtree(entry)
    entry.symlink_to(outside, target_is_directory=True)
    return outside


def _foreign_entry(cache: Path, entry: Path, outside: Path) -> Path:
    for p in (entry, *entry.iterdir()):
        os.chown(p, 12345, 12345)
    return entry


def _shard_outside(cache: Path, entry: Path, outside: Path) -> Path:
    shard = entry.parent
    shutil.copytree(shard, outside.parent)
    shutil.rmtree(shard)
    shard.symlink_to(outside.parent, target_is_directory=True)
    return outside


UNSAFE = {
    "entry is a symlink": (_symlinked_entry, "is a symlink"),
    "entry owned by another uid": (_foreign_entry, "owned by uid 12345"),
    "shard links outside the cache": (_shard_outside, "outside the cache root"),
}


@needs_rknn
@pytest.mark.parametrize("case", list(UNSAFE), ids=list(UNSAFE))
def test_an_unsafe_entry_is_refused_quarantined_and_rebuilt(
    case: str,
    mlp: models.TestModel,
    mlp_feed: dict[str, np.ndarray],
    mlp_expected: np.ndarray,
    pristine_cache: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if case == "entry owned by another uid" and (not hasattr(os, "chown") or os.geteuid() != 0):
        pytest.skip("needs root to give a file away")
    cache = _copy_cache(pristine_cache, tmp_path / "cache")
    (entry,) = h.entry_dirs(cache)
    make_unsafe, reason = UNSAFE[case]
    target = make_unsafe(cache, entry, tmp_path / "outside" / entry.name)
    # Even a blob with the right checksum is not read from an unsafe place.
    root = os.path.realpath(cache)
    unsafe_opens: list[str] = []
    real_open = os.open

    def watching_open(path: Any, *args: Any, **kwargs: Any) -> int:
        name = os.fspath(path)
        if str(name).endswith("model.rknn") and os.path.lexists(name):
            real = os.path.realpath(name)
            if (
                real != os.path.abspath(name)
                or not real.startswith(root + os.sep)
                or os.lstat(name).st_uid != os.geteuid()
                or os.stat(os.path.dirname(name)).st_uid != os.geteuid()
            ):
                unsafe_opens.append(name)
        return real_open(path, *args, **kwargs)

    caplog.set_level(logging.WARNING, logger="rkort.cache")
    monkeypatch.setattr(os, "open", watching_open)
    session = rknn_session(mlp.path, cache)
    monkeypatch.undo()

    warnings = cache_warnings(caplog)
    assert reason in warnings[0] and "quarantine" in warnings[0]
    assert unsafe_opens == [], "a blob in an unsafe place was opened"
    assert session.get_providers()[0] == RKNN
    assert cos(session.run(None, mlp_feed)[0], mlp_expected) >= 0.9999
    (rebuilt,) = h.entry_dirs(cache)
    assert not rebuilt.is_symlink() and not rebuilt.parent.is_symlink()
    assert os.path.realpath(rebuilt).startswith(root + os.sep)
    h.check_entry(rebuilt)
    assert os.listdir(cache / "quarantine")
    if case == "entry is a symlink":
        h.check_entry(target)  # what the link pointed at is left alone
    # A second session finds the rebuilt entry and has nothing to say.
    caplog.clear()
    rknn_session(mlp.path, cache)
    assert cache_warnings(caplog) == []


@needs_rknn
def test_cache_contents_are_never_unpickled(
    mlp: models.TestModel, pristine_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    bomb = pickle.dumps(Payload())
    cache = _copy_cache(pristine_cache, tmp_path / "cache")
    (entry,) = h.entry_dirs(cache)
    (entry / "meta.json").write_bytes(bomb)
    (entry / "model.rknn").write_bytes(bomb)
    caplog.set_level(logging.WARNING, logger="rkort.cache")
    session = rknn_session(mlp.path, cache)
    assert session.get_providers()[0] == RKNN
    assert not marker.exists()
    assert "not valid JSON" in cache_warnings(caplog)[0]
    h.check_entry(h.entry_dirs(cache)[0])


_UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
_UNSAFE_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}


def test_no_code_path_unpickles_or_evaluates_data() -> None:
    """Static: rkort imports no unpickler and calls no eval/exec; torch/yaml loaders are not
    used, numpy's only with allow_pickle=False. The one pickle channel is the toolkit worker's
    socket to its own child (never cache data)."""
    offenders = []
    for path in sorted((h.REPO / "rkort").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names]
                module = getattr(node, "module", None) or ""
                for name in [module, *names]:
                    if name.split(".")[0] in _UNSAFE_MODULES:
                        offenders.append(f"{path.name}:{node.lineno} imports {name}")
                if module == "multiprocessing.connection" and path.parent.name != "toolkit":
                    offenders.append(f"{path.name}:{node.lineno} uses pickled connections")
            elif isinstance(node, ast.Call):
                f = node.func
                name = (
                    f.id
                    if isinstance(f, ast.Name)
                    else f.attr
                    if isinstance(f, ast.Attribute)
                    else ""
                )
                if isinstance(f, ast.Name) and name in _UNSAFE_CALLS:
                    offenders.append(f"{path.name}:{node.lineno} calls {name}()")
                if name in {"load", "loads", "unsafe_load", "full_load"} and isinstance(
                    f, ast.Attribute
                ):
                    owner = f.value.id if isinstance(f.value, ast.Name) else ""
                    no_pickle = any(
                        k.arg == "allow_pickle"
                        and isinstance(k.value, ast.Constant)
                        and k.value.value is False
                        for k in node.keywords
                    )
                    if owner in {"np", "numpy"} and no_pickle:
                        continue  # numpy's loader with pickles refused reads arrays only
                    if owner in {"np", "numpy", "torch", "yaml", "pickle", "marshal"}:
                        offenders.append(f"{path.name}:{node.lineno} calls {owner}.{name}()")
    assert offenders == []
    source = "".join(p.read_text() for p in (h.REPO / "rkort" / "cache").glob("*.py"))
    source += (h.REPO / "rkort" / "files.py").read_text()
    assert "json.loads" in source and "Connection" not in source
