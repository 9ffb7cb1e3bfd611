"""Buckets fitted to recorded traffic: the optimum is exact, recording is correct and private under
threads and processes, `rkort buckets` reports it, and `rkort warmup --from-traffic` makes the
fitted shapes what sessions (host and board) use."""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import random
import stat
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rkort
from rkort import traffic
from rkort.buckets import waste
from rkort.cache import Cache
from rkort.cli import main as rkort_main
from rkort.fitting import fit, fits, padded_cost, partition_1d
from rkort.model import ModelSource
from rkort.traffic import (
    ShapeRecorder,
    fitted_signatures,
    merge_counts,
    read_traffic,
    recorded,
    traffic_dir,
    write_fitted,
)
from tests.conftest import needs_rknn
from tests.encoders import export_encoder

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["input_ids", "attention_mask"]


def _sig(batch: int, length: int) -> tuple[tuple[int, ...], ...]:
    return ((batch, length), (batch, length))


# -- the optimum is exact ---------------------------------------------------------------------


def _brute_1d(values: list[int], counts: list[int], k: int) -> int:
    best = math.inf
    for r in range(1, k + 1):
        for chosen in itertools.combinations(values, r):
            if chosen[-1] != values[-1]:
                continue
            best = min(
                best, sum(c * next(b for b in chosen if b >= v) for v, c in zip(values, counts))
            )
    return int(best)


def test_the_1d_partition_is_the_optimum_over_every_k_subset() -> None:
    rng = random.Random(0)
    for _ in range(300):
        values = sorted(rng.sample(range(1, 80), rng.randint(1, 9)))
        counts = [rng.randint(1, 20) for _ in values]
        k = rng.randint(1, 5)
        cost, buckets = partition_1d(values, counts, k)
        assert cost == _brute_1d(values, counts, k)
        assert len(buckets) <= k and buckets[-1] == values[-1]
        assert cost == sum(c * next(b for b in buckets if b >= v) for v, c in zip(values, counts))
        f = fit(Counter({(v,): c for v, c in zip(values, counts)}), k)
        assert f.exact and f.cost == cost and [s[0] for s in f.shapes] == buckets


def _restricted_cost(
    counts: Counter[tuple[int, int]], shapes: tuple[tuple[int, int], ...]
) -> float:
    """A call takes the smallest batch bucket that holds it, then its smallest sequence bucket."""
    batches = sorted({s[0] for s in shapes})
    total = 0
    for (b, n), calls in counts.items():
        bb = next((x for x in batches if x >= b), None)
        seqs = sorted(s[1] for s in shapes if s[0] == bb)
        ss = next((x for x in seqs if x >= n), None)
        if bb is None or ss is None:
            return math.inf
        total += calls * bb * ss
    return total


def _any_cost(counts: Counter[tuple[int, int]], shapes: tuple[tuple[int, int], ...]) -> float:
    """A call takes the cheapest shape that holds it (as sessions do); inf if none does."""
    try:
        return padded_cost(counts, shapes)
    except ValueError:
        return math.inf


def test_batch_and_sequence_exact_within_the_stated_family() -> None:
    """Two varying dims: the fit is the brute-force optimum of the family it states (each batch
    bucket with sequence buckets of its own), and sessions' cheapest-shape rule never costs
    more than that; the unrestricted optimum is a lower bound."""
    rng = random.Random(1)
    gaps = []
    for _ in range(150):
        counts: Counter[tuple[int, int]] = Counter()
        for _ in range(rng.randint(1, 7)):
            counts[(rng.choice([1, 2, 3, 4]), rng.randint(1, 20))] += rng.randint(1, 5)
        k = rng.randint(1, 4)
        grid = sorted({(b, n) for b, _ in counts for _, n in counts})
        subsets = [c for r in range(1, k + 1) for c in itertools.combinations(grid, r)]
        family = min(_restricted_cost(counts, c) for c in subsets)

        unrestricted = min(_any_cost(counts, c) for c in subsets)
        f = fit(counts, k)
        assert len(f.shapes) <= k
        assert _restricted_cost(counts, tuple(f.shapes)) == family
        assert unrestricted <= f.cost <= family
        varying = len({b for b, _ in counts}) > 1 and len({n for _, n in counts}) > 1
        assert f.exact == (not varying or f.cost == f.needed)
        if f.exact:
            assert f.cost == unrestricted
        gaps.append(f.cost / unrestricted)
    assert max(gaps) < 1.25  # what the restriction gave up on these instances


def test_more_shapes_never_cost_more_and_no_shape_is_useless() -> None:
    counts = Counter({(1, 5): 10, (1, 9): 3, (1, 30): 1})
    curve = fits(counts, 6)
    assert [len(f.shapes) for f in curve] == [1, 2, 3, 3, 3, 3]
    assert all(a.cost >= b.cost for a, b in zip(curve, curve[1:]))
    assert curve[-1].waste == 1.0
    with pytest.raises(ValueError):
        fit(counts, 0)


# -- recording --------------------------------------------------------------------------------


def test_threads_count_every_call(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    rec = ShapeRecorder(cache, "m" * 64, NAMES)

    def work(t: int) -> None:
        for i in range(2000):
            n = 1 + (i + t) % 7
            rec.record([np.zeros((1, n), np.int64), np.zeros((1, n), np.int64)])
            if i % 500 == 0:
                rec.flush()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.flush()
    counts = recorded(cache, "m" * 64)
    assert sum(counts.values()) == 16000
    want = Counter(_sig(1, 1 + (i + t) % 7) for t in range(8) for i in range(2000))
    assert counts == want


CHILD = """
import sys
import numpy as np
from rkort import traffic
from rkort.cache import Cache
traffic.FLUSH_SECONDS = 0.0  # merge on every call: the file lock is contended all the time
rec = traffic.ShapeRecorder(Cache(sys.argv[1]), "p" * 64, ["input_ids", "attention_mask"])
for i in range(150):
    n = 1 + i % 5
    rec.record([np.zeros((2, n), np.int64), np.zeros((2, n), np.int64)])
rec.flush()
"""


def test_processes_merge_without_losing_counts(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(cache)], env=env) for _ in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    counts = recorded(Cache(cache), "p" * 64)
    assert counts == Counter({_sig(2, n): 4 * 30 for n in range(1, 6)})
    leftovers = [p.name for p in traffic_dir(Cache(cache), "p" * 64).iterdir()]
    assert sorted(leftovers) == ["shapes.json", "shapes.lock"]  # no temporary file left behind


def test_only_shapes_are_stored_in_private_files(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    rec = ShapeRecorder(cache, "s" * 64, NAMES)
    secret = np.full((1, 3), 987654321, np.int64)
    rec.record([secret, np.ones((1, 3), np.int64)])
    rec.flush()
    directory = traffic_dir(cache, "s" * 64)
    text = (directory / "shapes.json").read_text()
    assert "987654321" not in text
    data = json.loads(text)
    assert set(data) == {"version", "inputs", "calls", "dropped", "counts"}
    assert data["inputs"] == NAMES and data["counts"] == [[[[1, 3], [1, 3]], 1]]
    for path in (cache.root / "traffic", directory):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_memory_and_file_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(traffic, "MAX_PENDING", 8)
    monkeypatch.setattr(traffic, "MAX_KEPT", 10)
    cache = Cache(tmp_path / "cache")
    rec = ShapeRecorder(cache, "b" * 64, NAMES)
    for n in range(1, 31):
        for _ in range(n):  # longer lengths are more frequent
            rec.record([np.zeros((1, n)), np.zeros((1, n))])
        assert len(rec._counts) <= 8
    rec.flush()
    found = read_traffic(cache, "b" * 64)
    assert found is not None and len(found.counts) == 10
    assert found.calls == sum(range(1, 31))
    assert set(found.counts) == {_sig(1, n) for n in range(21, 31)}  # the rarest were dropped


def test_an_unwritable_cache_never_fails_a_call(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    rec = ShapeRecorder(Cache(blocker), "u" * 64, NAMES)
    rec.record([np.zeros((1, 4)), np.zeros((1, 4))])
    rec.flush()  # logged at DEBUG, kept for the next try
    assert rec._counts == {_sig(1, 4): 1}
    rec.record([object()])  # type: ignore[list-item]  # not even a bad argument raises


def test_fitted_signatures_round_trip(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    assert fitted_signatures(cache, "f" * 64) is None
    write_fitted(cache, "f" * 64, NAMES, [_sig(1, 8), _sig(1, 20)], {"max_shapes": 2})
    assert fitted_signatures(cache, "f" * 64) == [_sig(1, 8), _sig(1, 20)]


# -- rkort buckets ----------------------------------------------------------------------------


def _tiny_encoder(path: Path, max_len: int = 64) -> Path:
    """input_ids, attention_mask [batch, sequence] -> y [batch, sequence]; a position table of
    ``max_len`` rows gives the model's limit (no RKNN needed: `rkort buckets` only reads)."""
    dims = ["batch_size", "sequence_length"]
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input_ids"], ["a"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["attention_mask"], ["b"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in NAMES],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        [numpy_helper.from_array(np.zeros((max_len, 2), np.float32), "position_embeddings")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _record(cache: Cache, model: Path, counts: Counter[tuple[tuple[int, ...], ...]]) -> None:
    merge_counts(cache, ModelSource(str(model)).content_hash(cache), NAMES, counts)


def test_rkort_buckets_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny_encoder(tmp_path / "tiny.onnx")
    cache = Cache(tmp_path / "cache")
    args = ["buckets", str(model), "--cache-dir", str(cache.root)]
    assert rkort_main(args) == 1
    assert "record_shapes=1" in capsys.readouterr().err
    lengths = Counter({5: 40, 9: 25, 12: 10, 20: 8, 33: 5, 47: 3, 64: 2, 100: 4})
    _record(cache, model, Counter({_sig(1, n): c for n, c in lengths.items()}))

    assert rkort_main([*args, "--max-shapes", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    held = {n: c for n, c in lengths.items() if n <= 64}
    expected = fit(Counter({(1, n): c for n, c in held.items()}), 3)
    assert out["samples"] == sum(held.values()) and out["calls"] == sum(lengths.values())
    assert out["buckets"] == {
        "batch_size": [1],
        "sequence_length": [s[1] for s in expected.shapes],
    }
    assert out["signatures"] == [[[1, s[1]], [1, s[1]]] for s in expected.shapes]
    flat = [n for n, c in held.items() for _ in range(c)]
    assert out["waste"] == pytest.approx(waste(flat, [s[1] for s in expected.shapes]), abs=1e-4)
    assert out["current_waste"] == pytest.approx(waste(flat, (16, 32, 64)), abs=1e-4)
    assert out["exact"] is True and out["distribution"]["sequence_length"]["5"] == 40
    assert sum(out["left_out"].values()) == 4  # the calls longer than the model's 64

    assert rkort_main([*args, "--max-shapes", "3", "--buckets", "8,64"]) == 0
    text = capsys.readouterr().out
    assert "5:40 9:25 12:10 20:8 33:5 47:3 64:2 100:4" in text
    assert f"sequence_length: {','.join(str(s[1]) for s in expected.shapes)}" in text
    current = waste(flat, (8, 64))
    assert f"current buckets {current:.2f}x" in text and "exact optimum" in text
    assert "rkort warmup" in text and "--from-traffic --max-shapes 3" in text


def test_rkort_buckets_with_batch_and_sequence_says_what_it_restricts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _tiny_encoder(tmp_path / "tiny.onnx")
    cache = Cache(tmp_path / "cache")
    calls = Counter({_sig(1, 7): 50, _sig(1, 30): 10, _sig(4, 12): 20, _sig(16, 60): 3})
    _record(cache, model, calls)
    assert rkort_main(["buckets", str(model), "--cache-dir", str(cache.root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # with 12 shapes allowed, each recorded signature is its own shape: no padding at all
    assert out["waste"] == 1.0 and out["exact"] is True
    assert out["buckets"] == {"batch_size": [1, 4, 16], "sequence_length": [7, 12, 30, 60]}
    # default batch buckets 1,2,4,8: a batch of 16 runs as two chunks of 8
    needed = 50 * 7 + 10 * 30 + 20 * 4 * 12 + 3 * 16 * 60
    computed = 50 * 16 + 10 * 32 + 20 * 4 * 16 + 3 * 2 * 8 * 64
    assert out["current_waste"] == pytest.approx(computed / needed, abs=1e-4)
    two = ["buckets", str(model), "--cache-dir", str(cache.root), "--max-shapes", "2", "--json"]
    assert rkort_main(two) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exact"] is False and "both vary" in out["note"]
    assert len(out["signatures"]) == 2


def test_dims_compiled_per_size_get_the_most_frequent_shapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "image",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "image.onnx"
    onnx.save(model, path)
    cache = Cache(tmp_path / "cache")
    calls = Counter({((1, 8, 8),): 5, ((1, 16, 8),): 3, ((1, 4, 4),): 1})
    merge_counts(cache, ModelSource(str(path)).content_hash(cache), ["x"], calls)
    args = ["buckets", str(path), "--cache-dir", str(cache.root), "--max-shapes", "2", "--json"]
    assert rkort_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["signatures"] == [[[1, 8, 8]], [[1, 16, 8]]] and out["buckets"] == {}
    assert out["samples"] == 8 and out["distribution"]["h"] == {"4": 1, "8": 5, "16": 3}
    assert "compiled per observed size" in out["note"]


# -- warmup --from-traffic, then sessions on the host and on a board ---------------------------

RECORDED = {5: 3, 9: 2, 14: 1}  # length -> calls


@pytest.fixture(scope="module")
def fitted_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[int]]:
    """A distilbert whose session recorded RECORDED (record_shapes=1), then `rkort warmup
    --from-traffic --max-shapes 2`: (model, cache, the fitted lengths)."""
    directory = tmp_path_factory.mktemp("fitted")
    model = export_encoder("distilbert", directory, max_len=64)
    cache = directory / "cache"
    options = {"cache_dir": str(cache), "record_shapes": "1"}
    sess = rkort.InferenceSession(str(model), providers=[("RKNN", options), "CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n, calls in RECORDED.items():
        for _ in range(calls):
            ids = rng.integers(1, 1000, (1, n)).astype(np.int64)
            sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    del sess
    gc.collect()
    counts = recorded(Cache(cache), ModelSource(str(model)).content_hash(Cache(cache)))
    assert counts == Counter({_sig(1, n): c for n, c in RECORDED.items()})
    env = {**os.environ, "RKORT_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-m", "rkort", "warmup", str(model), "--from-traffic", "--max-shapes", "2"]
        + ["-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    assert "2 compiled" in done.stdout and "sessions of this model use them" in done.stdout
    best = fit(Counter({(1, n): c for n, c in RECORDED.items()}), 2)
    return model, cache, [s[1] for s in best.shapes]


@needs_rknn
def test_a_session_after_warmup_from_traffic_uses_the_fitted_shapes(
    fitted_cache: tuple[Path, Path, list[int]],
) -> None:
    model, cache, lengths = fitted_cache
    sess = rkort.InferenceSession(
        str(model), providers=[("RKNN", {"cache_dir": str(cache)}), "CPUExecutionProvider"]
    )
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for n in RECORDED:
        ids = rng.integers(1, 1000, (1, n)).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        got, want = sess.run(None, feed)[0], ref.run(None, feed)[0]
        assert got.shape == want.shape
        assert np.allclose(got, want, atol=0.05)
    stats = rkort.session_stats(sess)
    assert stats["compiles"] == 0 and stats["cpu_calls"] == 0
    assert sorted({s[0][1] for s in sess._rknn.opened}) == lengths  # type: ignore[attr-defined]


@needs_rknn
def test_a_board_uses_the_fitted_shapes(
    fitted_cache: tuple[Path, Path, list[int]], tmp_path: Path
) -> None:
    from tests.test_board import rehearse

    model, cache, lengths = fitted_cache
    done, stats, outputs = rehearse(model, cache, tmp_path / "out", lengths=tuple(RECORDED))
    assert stats["compiles"] == 0 and stats["cpu_calls"] == 0
    assert stats["npu_calls"] == len(RECORDED)
    # the recording session also left its default bucket (16) in the cache; the board prefers
    # the cheaper fitted shapes, so it loads exactly those
    assert stats["blobs_loaded"] == len(lengths)
    assert "0 compile(s)" in done.stderr + done.stdout
