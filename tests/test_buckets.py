"""Dynamic shapes on RKNN: inputs padded to buckets, outputs sliced back, against onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import rkort
from rkort.buckets import waste
from rkort.capi.onnxruntime_pybind11_state import InvalidArgument
from tests.conftest import RKNN, needs_rknn
from tests.encoders import export_encoder

pytestmark = needs_rknn
MAX = 64


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _feed(
    names: list[str], batch: int, length: int, rng: np.random.Generator, low: int, high: int
) -> dict[str, np.ndarray]:
    ids = rng.integers(low, high, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    if batch > 1 and length > 1:
        mask[1, length // 2 :] = 0  # a shorter sentence padded by the tokenizer
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros((batch, length), np.int64)
    return feed


ENCODERS = {
    # kind: (vocab, lowest id used): RoBERTa's vocabulary is above 32,767 and so are its ids
    "bert": (1000, 0),
    "distilbert": (1000, 0),
    "roberta": (40000, 32768),
}


@pytest.fixture(scope="module", params=list(ENCODERS))
def encoder(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    kind = request.param
    vocab, low = ENCODERS[kind]
    d = tmp_path_factory.mktemp(kind)
    path = export_encoder(kind, d, max_len=MAX, vocab=vocab)
    sess = rkort.InferenceSession(
        path,
        providers=[
            (RKNN, {"cache_dir": str(d / "cache"), "batch_buckets": "1,4", "max_live_shapes": "8"})
        ],
    )
    ref = ort.InferenceSession(str(path))
    yield kind, sess, ref, (low, vocab)


def test_every_length_and_batch_matches_onnxruntime(encoder) -> None:  # type: ignore[no-untyped-def]
    kind, sess, ref, (low, high) = encoder
    assert sess.get_providers()[0] == RKNN
    names = [i.name for i in sess.get_inputs()]
    rng = np.random.default_rng(1)
    used = set()
    for batch in (1, 3):
        for length in range(1, MAX + 1):
            feed = _feed(names, batch, length, rng, low, high)
            got = sess.run(None, feed)
            want = ref.run(None, feed)
            assert got[0].shape == want[0].shape == (batch, length, 64)
            assert got[0].dtype == want[0].dtype
            if batch > 1 and length > 1:
                # rows of the shorter sentence: only its valid positions are meaningful
                got[0][1, length // 2 :] = want[0][1, length // 2 :] = 0
            assert _cos(got[0], want[0]) >= 0.9999, (kind, batch, length)
            used.add((1 if batch == 1 else 4, next(b for b in (16, 32, 64) if b >= length)))
    # one compile (or cache load) per distinct bucket signature, no more
    opened = [sig[0] for sig in sess._rknn.opened]
    assert sorted(opened) == sorted(used)
    assert len(opened) == len(set(opened)) == 6


def test_over_the_largest_bucket_is_a_clear_error(encoder) -> None:  # type: ignore[no-untyped-def]
    kind, sess, ref, (low, high) = encoder
    names = [i.name for i in sess.get_inputs()]
    feed = _feed(names, 1, MAX + 1, np.random.default_rng(0), low, high)
    with pytest.raises(
        InvalidArgument,
        match=r"input 'input_ids' has sequence_length=65 at axis 1, more than the largest bucket \(64\)",
    ):
        sess.run(None, feed)
    # the session is not harmed
    ok = _feed(names, 1, 5, np.random.default_rng(0), low, high)
    assert _cos(sess.run(None, ok)[0], ref.run(None, ok)[0]) >= 0.9999


def test_oversize_can_run_on_the_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = export_encoder("distilbert", tmp_path, max_len=MAX)
    sess = rkort.InferenceSession(
        path,
        providers=[
            (
                RKNN,
                {
                    "buckets": "16",
                    "batch_buckets": "1",
                    "oversize": "cpu",
                    "cache_dir": str(tmp_path / "c"),
                },
            )
        ],
    )
    feed = _feed(["input_ids", "attention_mask"], 1, 40, np.random.default_rng(0), 0, 1000)
    np.testing.assert_array_equal(
        sess.run(None, feed)[0], ort.InferenceSession(str(path)).run(None, feed)[0]
    )
    assert len(sess._rknn.opened) == 1  # only the eagerly opened (1, 16)


def test_batch_larger_than_the_largest_bucket_runs_in_chunks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = export_encoder("bert", tmp_path, max_len=MAX)
    sess = rkort.InferenceSession(
        path,
        providers=[
            (RKNN, {"buckets": "16", "batch_buckets": "1,2", "cache_dir": str(tmp_path / "c")})
        ],
    )
    feed = _feed(
        ["input_ids", "attention_mask", "token_type_ids"], 5, 9, np.random.default_rng(0), 0, 1000
    )
    got = sess.run(None, feed)[0]
    want = ort.InferenceSession(str(path)).run(None, feed)[0]
    assert got.shape == (5, 9, 64)
    got[1, 4:] = want[1, 4:] = 0
    assert _cos(got, want) >= 0.9999
    assert [s[0] for s in sess._rknn.opened] == [(1, 16), (2, 16)]


def test_empty_inputs_behave_as_onnxruntime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from compat.test_conformance import _outcome

    path = export_encoder("distilbert", tmp_path, max_len=MAX)
    sess = rkort.InferenceSession(
        path,
        providers=[
            (RKNN, {"buckets": "16", "batch_buckets": "1", "cache_dir": str(tmp_path / "c")})
        ],
    )
    ref = ort.InferenceSession(str(path))
    for shape in [(0, 5), (1, 0)]:
        feed = {n: np.ones(shape, np.int64) for n in ("input_ids", "attention_mask")}
        a, b = _outcome(lambda f=feed: ref.run(None, f)), _outcome(lambda f=feed: sess.run(None, f))
        assert a[0] == b[0]
        if a[0] == "error":
            assert type(a[1]) is type(b[1]) and str(a[1]) == str(b[1])
        else:
            np.testing.assert_array_equal(a[1][0], b[1][0])


def _dynamic_session(path, tmp_path):  # type: ignore[no-untyped-def]
    return rkort.InferenceSession(
        path,
        providers=[
            (
                RKNN,
                {
                    "shape_mode": "dynamic",
                    "buckets": "16,32",
                    "batch_buckets": "1,2",
                    "pad_values": "input_ids=1",
                    "cache_dir": str(tmp_path / "c"),
                },
            )
        ],
    )


def _check_lengths(sess, ref) -> None:  # type: ignore[no-untyped-def]
    for batch, length in [(1, 3), (2, 17), (1, 32)]:
        feed = _feed(
            ["input_ids", "attention_mask"],
            batch,
            length,
            np.random.default_rng(length),
            32768,
            40000,
        )
        got, want = sess.run(None, feed)[0], ref.run(None, feed)[0]
        if batch > 1:
            got[1, length // 2 :] = want[1, length // 2 :] = 0
        assert got.shape == want.shape and _cos(got, want) >= 0.9999


def test_user_pad_values_and_multi_shape_blob(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = export_encoder("distilbert", tmp_path, max_len=MAX, vocab=40000)
    sess = _dynamic_session(path, tmp_path)
    assert len(sess._rknn.opened) == 1  # one multi-shape blob for all four signatures
    _check_lengths(sess, ort.InferenceSession(str(path)))
    assert len(sess._rknn.opened) == 1


def test_multi_shape_mode_keeps_the_placement(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """RoBERTa's CumSum (position ids) is missing from board runtimes: in shape_mode=dynamic it
    stays on the CPU as in per-bucket mode, so each bucket gets a segmented program."""
    path = export_encoder("roberta", tmp_path, max_len=MAX, vocab=40000)
    sess = _dynamic_session(path, tmp_path)
    program = next(iter(sess._rknn._programs.values()))
    assert [s.device for s in program.segments][:2] == ["cpu", "npu"]
    _check_lengths(sess, ort.InferenceSession(str(path)))
    assert len(sess._rknn.opened) == 3  # three signatures, one program each


def _dynamic_cnn(path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4, "H", "W"])
    k = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "K")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "K"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["features"]),
        ],
        "cnn",
        [x],
        [y],
        [k],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_cnn_with_dynamic_height_and_width_compiles_exact_shapes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cnn.onnx"
    _dynamic_cnn(path)
    sess = rkort.InferenceSession(
        path,
        providers=[
            (RKNN, {"max_live_shapes": "2", "batch_buckets": "1", "cache_dir": str(tmp_path / "c")})
        ],
    )
    assert sess._rknn.policy.kind == {"N": "batch", "H": "exact", "W": "exact"}
    ref = ort.InferenceSession(str(path))
    rng = np.random.default_rng(0)
    for h, w in [(8, 8), (12, 10), (8, 8), (5, 7), (12, 10)]:
        feed = {"image": rng.standard_normal((1, 3, h, w)).astype(np.float32)}
        got, want = sess.run(None, feed)[0], ref.run(None, feed)[0]
        assert got.shape == want.shape == (1, 4, h, w)
        assert _cos(got, want) >= 0.9999
    # 8x8 and 12x10 open; 8x8 is used again, so 5x7 evicts 12x10, which is then reopened
    assert [s[0][2:] for s in sess._rknn.opened] == [(8, 8), (12, 10), (5, 7), (12, 10)]
    assert len(sess._rknn._programs) == 2


def test_warmup_compiles_exactly_the_buckets_asked_for(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = export_encoder("distilbert", tmp_path, max_len=MAX)
    env = {**os.environ, "RKORT_CACHE_DIR": str(tmp_path / "c")}
    cmd = [
        sys.executable,
        "-m",
        "rkort",
        "warmup",
        str(path),
        "--buckets",
        "16,32",
        "--batch-buckets",
        "1",
        "-q",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "2 compiled, 0 already in the cache" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert "0 compiled, 2 already in the cache" in second.stdout
    listing = json.loads(
        subprocess.run(
            [sys.executable, "-m", "rkort", "cache", "list", "--json"],
            capture_output=True,
            text=True,
            env=env,
        ).stdout
    )
    assert sorted(r["inputs"]["input_ids"] for r in listing) == [[1, 16], [1, 32]]


def test_padding_waste_measure() -> None:
    assert waste([10, 20, 30], [16, 32]) == pytest.approx((16 + 32 + 32) / 60)
    assert waste([], [16]) == 1.0
