"""Board throughput: one context per NPU core, opened when calls overlap, each used by one thread
at a time; run_async; a batch split across cores; core masks restrict the pool. On the rehearsed
board (RKNNLite's stand-in, which refuses a context used by two threads at once) and the host."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import rkort
from rkort.toolkit.process import WorkerProcess
from tests import models
from tests.conftest import RKNN, needs_rknn
from tests.rehearsal import rehearse_in_process

pytestmark = needs_rknn


@pytest.fixture
def board(tmp_path: Path) -> Iterator[None]:
    with rehearse_in_process("rk3588", tmp_path):
        yield


def _live_workers() -> list[WorkerProcess]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, WorkerProcess) and o.proc.poll() is None]


def _session(path: Path, cache: Path, **options: str) -> rkort.InferenceSession:
    return rkort.InferenceSession(
        path, providers=[(RKNN, {"cache_dir": str(cache), **options}), "CPUExecutionProvider"]
    )


def test_threads_run_on_every_core_with_serial_results(
    board: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="rknnlite")
    m = models.mlp(tmp_path)
    before = len(_live_workers())
    sess = _session(m.path, tmp_path / "cache")
    feeds = [dict(zip(m.input_names, m.make_feed(i))) for i in range(6)]
    serial = [sess.run(None, f)[0] for f in feeds]
    assert rkort.session_stats(sess)["contexts"] == {"NPU core 0": 6}  # no overlap: one context
    start = threading.Barrier(6)
    wrong: list[int] = []

    def work(t: int) -> None:
        start.wait()
        for k in range(8):
            i = (t + k) % len(feeds)
            if not np.array_equal(sess.run(None, feeds[i])[0], serial[i]):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = rkort.session_stats(sess)
    assert wrong == [] and stats["npu_calls"] == 6 + 48 and stats["cpu_calls"] == 0
    assert set(stats["contexts"]) == {"NPU core 0", "NPU core 1", "NPU core 2"}
    assert [r for r in caplog.records if "two threads" in r.getMessage()] == []
    sess._close_rknn()
    assert len(_live_workers()) == before  # no context outlives its session


def test_a_core_mask_restricts_the_pool(board: None, tmp_path: Path) -> None:
    m = models.mlp(tmp_path)
    sess = _session(m.path, tmp_path / "cache", core_mask="1_2")
    feed = dict(zip(m.input_names, m.make_feed(0)))
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        for _ in range(5):
            sess.run(None, feed)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    contexts = rkort.session_stats(sess)["contexts"]
    assert set(contexts) <= {"NPU core 1", "NPU core 2"} and sum(contexts.values()) == 20


def test_run_async_is_served_by_the_pool(board: None, tmp_path: Path) -> None:
    m = models.mlp(tmp_path)
    sess = _session(m.path, tmp_path / "cache")
    feeds = [dict(zip(m.input_names, m.make_feed(i))) for i in range(12)]
    want = [ort.InferenceSession(str(m.path)).run(None, f)[0] for f in feeds]
    results: dict[int, np.ndarray] = {}
    errors: list[str] = []
    done = threading.Semaphore(0)

    def callback(outputs: list[np.ndarray], user_data: int, err: str) -> None:
        if err:
            errors.append(err)
        else:
            results[user_data] = outputs[0]
        done.release()

    for i, f in enumerate(feeds):
        sess.run_async(None, f, callback, i)
    for _ in feeds:
        assert done.acquire(timeout=120)
    assert errors == [] and sorted(results) == list(range(12))
    for i, w in enumerate(want):
        np.testing.assert_allclose(results[i], w, atol=1e-2)
    # A mistake reaches the callback as onnxruntime words it.
    bad = {m.input_names[0]: feeds[0][m.input_names[0]].astype(np.float64)}
    sess.run_async(None, bad, callback, 99)
    assert done.acquire(timeout=60)
    assert errors == [
        "Unexpected input data type. Actual: (tensor(double)) , expected: (tensor(float))"
    ]
    with pytest.raises(ValueError, match="Required inputs"):
        sess.run_async(None, {}, callback, 0)


def _batched_mlp(tmp_path: Path) -> Path:
    m = models.mlp(tmp_path)
    proto = onnx.load(str(m.path))
    for vi in [*proto.graph.input, *proto.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "batched.onnx"
    onnx.save(proto, str(path))
    return path


def test_a_large_batch_is_split_across_cores(board: None, tmp_path: Path) -> None:
    path = _batched_mlp(tmp_path)
    sess = _session(path, tmp_path / "cache", batch_buckets="2")
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-2)
    contexts = rkort.session_stats(sess)["contexts"]
    assert sum(contexts.values()) == 3 and len(contexts) >= 2  # three chunks, several cores


def test_two_host_callers_use_two_simulator_workers(tmp_path: Path) -> None:
    m = models.mlp(tmp_path)
    sess = _session(m.path, tmp_path / "cache")
    feed = dict(zip(m.input_names, m.make_feed(0)))
    barrier = threading.Barrier(2)

    def work() -> None:
        barrier.wait()
        for _ in range(20):
            sess.run(None, feed)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    contexts = rkort.session_stats(sess)["contexts"]
    assert sum(contexts.values()) == 40
    assert set(contexts) <= {"simulator context 0", "simulator context 1"}
