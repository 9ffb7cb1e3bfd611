"""Quantization users can trust: each NPU part calibrated from the user's data for its own shape
and its own input tensors, measured against onnxruntime on held-out samples, and replaced (hybrid,
then fp16, with a warning) when it falls short; the figures kept in the blob's cache entry.

Real quantized blobs on the host simulator, real calibration data: a static CNN, a BERT-like
encoder with buckets 16 and 32, segmented models whose NPU parts read intermediate tensors, a model
made inaccurate on purpose, recorded feeds, and quantized blobs warmed on the host serving a board
rehearsal with 0 compiles.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rkort
from rkort.accuracy import compare, cosine, label_agreement
from rkort.cache import Cache
from rkort.errors import InvalidArgument
from rkort.integrations.install import uninstall
from rkort.spec import BuildSpec, dtype_refusal
from tests import hf_models, models
from tests.conftest import RKNN, needs_rknn
from tests.encoders import export_encoder
from tests.test_board import rehearse
from tests.test_board import rkort as rkort_cli

CPU = "CPUExecutionProvider"


# -- helpers ---------------------------------------------------------------------------------------


def session(model: Path, cache: Path, **options: str) -> rkort.InferenceSession:
    return rkort.InferenceSession(
        str(model), providers=[(RKNN, {"cache_dir": str(cache), **options}), CPU]
    )


def entries(cache: Path) -> list[dict[str, Any]]:
    """The metadata of every cache entry, oldest first."""
    found = sorted(Cache(cache).entries(), key=lambda e: e.created)
    return [e.meta for e in found]


def save_feeds(folder: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"feed-{i:03d}.npz", **feed)
    return folder


def token_feed(rng: np.random.Generator, length: int, names: list[str]) -> dict[str, np.ndarray]:
    feed = {
        "input_ids": rng.integers(5, 1000, (1, length)).astype(np.int64),
        "attention_mask": np.ones((1, length), np.int64),
        "token_type_ids": np.zeros((1, length), np.int64),
    }
    return {k: v for k, v in feed.items() if k in names}


def assert_close_to_onnxruntime(
    model: Path, sess: Any, feeds: list[dict[str, np.ndarray]], floor: float
) -> list[float]:
    ref = ort.InferenceSession(str(model), providers=[CPU])
    found = []
    for feed in feeds:
        want, got = ref.run(None, feed), sess.run(None, feed)
        for w, g in zip(want, got):
            assert g.shape == w.shape and g.dtype == w.dtype
            found.append(cosine(w, g))
    assert min(found) >= floor, found
    return found


def dataset_shapes(meta: dict[str, Any]) -> list[list[tuple[int, ...]]]:
    """The shapes of each calibration sample of the dataset a blob was built from."""
    dataset = Path(meta["source"]["spec"]["dataset"])
    rows = []
    for line in dataset.read_text().splitlines():
        rows.append([np.load(dataset.parent / p).shape for p in line.split()])
    return rows


# -- pure parts (no toolkit) -----------------------------------------------------------------------


def test_figures() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0 and cosine(np.zeros(3), np.ones(3)) == 0.0
    assert cosine(np.array([np.nan, 1.0]), np.array([1.0, 1.0])) == 0.0
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]], np.float32)
    assert label_agreement(scores, scores[:, [1, 0, 2]]) == 0.0
    assert label_agreement(scores, scores * 2) == 1.0
    assert label_agreement(np.zeros((1, 8, 64)), np.zeros((1, 8, 64))) is None  # hidden states
    figures = compare(["y"], [[scores]], [[scores + 0.01]])
    assert figures.passes(0.99) and figures.outputs[0].labels == 1.0
    assert "1 held-out sample" in figures.summary()


def test_what_the_toolkit_takes_per_target(tmp_path: Path) -> None:
    assert dtype_refusal("w8a8", "rk3566") is None
    assert dtype_refusal("w16a16i_dfp", "rk3588") is None
    assert dtype_refusal("w8a16", "rk3562") is None and dtype_refusal("w4a16", "rk3576") is None
    assert "rk3562" in str(dtype_refusal("w8a16", "rk3588"))
    assert "rk3576" in str(dtype_refusal("w4a16", "rk3588"))
    model = models.mlp(tmp_path)
    with pytest.raises(ValueError, match="w8a16 is for rk3562"):
        models.spec_of(model, quantized_dtype="w8a16", calibration="0" * 64)
    quantized = models.spec_of(model, quantized_dtype="w8a8", calibration="1" * 64)
    keys = {
        json.dumps(s.key_parts(), sort_keys=True)
        for s in [
            quantized,
            models.spec_of(model, quantized_dtype="w8a8", calibration="2" * 64),
            models.spec_of(
                model, quantized_dtype="w8a8", calibration="1" * 64, quant_algorithm="mmse"
            ),
            models.spec_of(
                model, quantized_dtype="w8a8", calibration="1" * 64, quant_method="layer"
            ),
            models.spec_of(model, quantized_dtype="w8a8", calibration="1" * 64, min_cosine=0.9),
        ]
    }
    assert len(keys) == 5
    # A float build's key is what it was before quantization had options.
    assert "quantization" not in models.spec_of(model).key_parts()
    # A blob's recipe carries how it was quantized; a record's spec takes it from the config.
    layered = BuildSpec.from_json(
        {**quantized.to_json(), "quantization": {"hybrid": "layers", "float_layers": ["a", "b"]}},
        str(model.path),
        quantized_dtype="w8a8",
        calibration="1" * 64,
    )
    assert layered.hybrid == "layers" and layered.float_layers == ("a", "b")


def test_bad_options_raise_invalid_argument(tmp_path: Path) -> None:
    model = models.mlp(tmp_path)
    folder = save_feeds(tmp_path / "cal", [{"x": model.make_feed(i)[0]} for i in range(3)])
    for options, needle in [
        ({"dtype": "w8a8"}, "calibration data"),
        ({"dtype": "w8a8", "calibration": str(tmp_path / "nope")}, "calibration"),
        ({"dtype": "w8a8", "calibration_text": str(tmp_path / "nope.txt")}, "calibration_text"),
        (
            {"dtype": "w8a8", "calibration": str(folder), "quant_algorithm": "best"},
            "quant_algorithm",
        ),
        ({"dtype": "w8a8", "calibration": str(folder), "quant_method": "group"}, "quant_method"),
        ({"dtype": "w8a8", "calibration": str(folder), "min_cosine": "1.5"}, "min_cosine"),
        ({"dtype": "w2a2", "calibration": str(folder)}, "dtype"),
    ]:
        with pytest.raises(InvalidArgument, match=needle):
            rkort.InferenceSession(str(model.path), providers=[(RKNN, options)])
    text = tmp_path / "cal.txt"
    text.write_text("the cat sat\n")
    with pytest.raises(InvalidArgument, match="tokenizer"):
        rkort.InferenceSession(
            str(model.path), providers=[(RKNN, {"dtype": "w8a8", "calibration_text": str(text)})]
        )
    # A dtype the target does not take: onnxruntime's InvalidArgument, from the command line too.
    done = rkort_cli(
        "warmup", str(model.path), "--dtype", "w8a16", "--calibration", str(folder),
        cache=tmp_path / "cache",
    )  # fmt: skip
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr
    assert "w8a16 is for rk3562 only" in done.stderr


# -- real builds -----------------------------------------------------------------------------------


def cnn(path: Path) -> Path:
    """x[1, 3, 32, 32] -> 3 x (Conv 3x3 + Relu + MaxPool) -> GlobalAveragePool -> Gemm: 10 class
    scores; random weights."""
    rng = np.random.default_rng(0)
    nodes, inits, prev, channels = [], [], "x", 3
    for i, out in enumerate((16, 32, 64)):
        w = rng.standard_normal((out, channels, 3, 3)) / np.sqrt(9 * channels)
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
            numpy_helper.from_array((0.1 * rng.standard_normal(out)).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], f"conv{i}", pads=[1] * 4),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], f"relu{i}"),
            helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], f"pool{i}", kernel_shape=[2, 2], strides=[2, 2]),
        ]  # fmt: skip
        prev, channels = f"p{i}", out
    inits += [
        numpy_helper.from_array((rng.standard_normal((10, 64)) / 8).astype(np.float32), "wf"),
        numpy_helper.from_array(np.zeros(10, np.float32), "bf"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], "fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def images(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(count)]


@needs_rknn
def test_a_static_cnn_calibrated_from_a_folder(tmp_path: Path) -> None:
    model = cnn(tmp_path / "cnn.onnx")
    folder = save_feeds(tmp_path / "cal", images(30, 1))
    sess = session(model, tmp_path / "cache", dtype="w8a8", calibration=str(folder))
    assert sess.get_providers() == [RKNN, CPU]
    fresh = images(16, 2)
    assert_close_to_onnxruntime(model, sess, fresh, 0.99)
    ref = ort.InferenceSession(str(model), providers=[CPU])
    labels = [
        int(sess.run(None, f)[0].argmax()) == int(ref.run(None, f)[0].argmax()) for f in fresh
    ]
    assert all(labels)
    (meta,) = entries(tmp_path / "cache")
    q = meta["quantization"]
    assert meta["dtype"] == "w8a8" and q["built"] == "w8a8" and q["measured"]
    assert q["calibration"] == {
        "source": f"calibration={folder}",
        "samples": 24,
        "held_out": 6,
        "in_sample": False,
    }
    assert q["cosine_min"] >= 0.99 and q["figures"]["outputs"][0]["labels"] == 1.0
    assert q["quant_algorithm"] == "normal" and q["quant_method"] == "channel"
    assert dataset_shapes(meta) == [[(1, 3, 32, 32)]] * 24
    assert meta["source"]["spec"]["quantization"]["calibration"] is not None
    # The calibration counts in the key: another folder builds another blob.
    other = save_feeds(tmp_path / "other", images(10, 3))
    session(model, tmp_path / "cache", dtype="w8a8", calibration=str(other))
    assert len(entries(tmp_path / "cache")) == 2


@needs_rknn
def test_the_toolkits_own_dataset_file_keeps_working_for_a_static_model(tmp_path: Path) -> None:
    model = cnn(tmp_path / "cnn.onnx")
    lines = []
    for i, feed in enumerate(images(12, 4)):
        np.save(tmp_path / f"s{i}.npy", feed["x"])
        lines.append(f"s{i}.npy")
    dataset = tmp_path / "dataset.txt"
    dataset.write_text("\n".join(lines) + "\n")
    sess = session(model, tmp_path / "cache", dtype="w8a8", dataset=str(dataset))
    assert sess.get_providers() == [RKNN, CPU]
    assert_close_to_onnxruntime(model, sess, images(4, 5), 0.99)
    (meta,) = entries(tmp_path / "cache")
    assert meta["source"]["spec"]["dataset"] == str(dataset)  # the file as given
    cal = meta["quantization"]["calibration"]
    assert cal["samples"] == 12 and cal["in_sample"]  # measured on its own samples, and says so


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_encoder("bert", tmp_path_factory.mktemp("bert"), max_len=64)


@pytest.fixture(scope="module")
def bert_feeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 feeds of 4 to 30 tokens (any valid shape: each its own length)."""
    rng = np.random.default_rng(7)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    feeds = [token_feed(rng, int(n), names) for n in rng.integers(4, 31, 40)]
    return save_feeds(tmp_path_factory.mktemp("bert-cal"), feeds)


@needs_rknn
def test_an_encoder_is_calibrated_per_bucket(bert: Path, bert_feeds: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    sess = session(
        bert, cache, dtype="w8a8", calibration=str(bert_feeds), buckets="16,32", batch_buckets="1"
    )
    assert sess.get_providers() == [RKNN, CPU]
    rng = np.random.default_rng(8)
    names = [i.name for i in sess.get_inputs()]
    feeds = [token_feed(rng, n, names) for n in (6, 12, 20, 29)]
    assert_close_to_onnxruntime(bert, sess, feeds, 0.99)
    metas = {meta["inputs"]["input_ids"][1]: meta for meta in entries(cache)}
    assert sorted(metas) == [16, 32]
    lengths = [np.load(p)["input_ids"].shape[1] for p in sorted(bert_feeds.glob("*.npz"))]
    for bucket, meta in metas.items():
        q = meta["quantization"]
        assert q["measured"] and q["cosine_min"] >= 0.99, q
        # Each bucket calibrates on the feeds that fit it, padded to it as a session pads them.
        fits = sum(n <= bucket for n in lengths)
        cal = q["calibration"]
        assert cal["samples"] + cal["held_out"] == fits
        assert dataset_shapes(meta) == [[(1, bucket)] * 3] * cal["samples"]


@needs_rknn
def test_text_and_a_tokenizer_calibrate_an_encoder(bert: Path, tmp_path: Path) -> None:
    hf_models.tokenizer(tmp_path / "tok")
    words = hf_models.WORDS
    rng = np.random.default_rng(9)
    text = tmp_path / "cal.txt"
    text.write_text(
        "\n".join(" ".join(rng.choice(words, int(rng.integers(3, 40)))) for _ in range(25)) + "\n"
    )
    cache = tmp_path / "cache"
    sess = session(
        bert,
        cache,
        dtype="w8a8",
        calibration_text=str(text),
        tokenizer=str(tmp_path / "tok"),
        buckets="16",
        batch_buckets="1",
    )
    assert sess.get_providers() == [RKNN, CPU]
    (meta,) = entries(cache)
    cal = meta["quantization"]["calibration"]
    # Every line is used: a longer one is cut to the bucket by the tokenizer.
    assert cal["samples"] + cal["held_out"] == 25 and not cal["in_sample"]
    first = np.load(Path(meta["source"]["spec"]["dataset"]).parent / "s000-0.npy")
    assert first.shape == (1, 16) and first[0, 0] == hf_models.VOCAB.index("[CLS]")


def outlier_mlp(path: Path, factor: float = 60.0) -> Path:
    """x[1, 64] -> MatMul -> MatMul -> Tanh -> y[1, 64], where one hidden unit of the first
    layer is ``factor`` times larger than the rest (and read that much smaller): its int8 range
    leaves the other units a few levels each."""
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    w1[:, 0] *= factor
    w2[0, :] /= factor
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], "layer1"),
            helper.make_node("MatMul", ["h", "w2"], ["z"], "layer2"),
            helper.make_node("Tanh", ["z"], ["y"], "tanh"),
        ],
        "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def vectors(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(count)]


@needs_rknn
def test_an_inaccurate_build_is_replaced_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = outlier_mlp(tmp_path / "outlier.onnx")
    folder = save_feeds(tmp_path / "cal", vectors(20, 1))
    caplog.set_level(logging.WARNING, logger="rkort")
    sess = session(model, tmp_path / "cache", dtype="w8a8", calibration=str(folder))
    assert sess.get_providers() == [RKNN, CPU]
    assert_close_to_onnxruntime(model, sess, vectors(8, 2), 0.99)
    (meta,) = entries(tmp_path / "cache")
    q = meta["quantization"]
    attempts = q["attempts"]
    assert attempts[0]["build"] == "w8a8" and attempts[0]["cosine_min"] < 0.99
    assert q["built"] != "w8a8" and q["cosine_min"] >= 0.99
    assert "float16 layers" in q["built"] or "hybrid" in q["built"]  # a hybrid rescues it
    assert meta["dtype"] == "w8a8"  # what was asked; "built" says what ships
    (warning,) = [r.getMessage() for r in caplog.records if "min_cosine" in r.getMessage()]
    assert "below min_cosine 0.99" in warning and f"shipping {q['built']}" in warning
    assert f"w8a8: cosine {attempts[0]['cosine_min']:.4f}" in warning
    # A session on the warmed cache runs what shipped (its recipe), and compiles nothing.
    again = session(model, tmp_path / "cache", dtype="w8a8", calibration=str(folder))
    assert_close_to_onnxruntime(model, again, vectors(4, 4), 0.99)
    assert rkort.session_stats(again)["compiles"] == 0
    # Nothing but float16 meets a goal this strict: fp16 ships, and the warning says so.
    caplog.clear()
    strict = session(
        model, tmp_path / "strict", dtype="w8a8", calibration=str(folder), min_cosine="0.999999"
    )
    (meta,) = entries(tmp_path / "strict")
    assert meta["quantization"]["built"] == "fp16"
    assert [a["build"] for a in meta["quantization"]["attempts"]][-1] == "fp16"
    assert meta["source"]["spec"]["quantized_dtype"] is None  # a board rebuilds what shipped
    assert any("shipping fp16" in r.getMessage() for r in caplog.records)
    assert_close_to_onnxruntime(model, strict, vectors(4, 3), 0.9999)


@needs_rknn
@pytest.mark.parametrize("kind", ["bert_with_cpu_op", "cpu_islands"])
def test_segments_calibrate_on_their_own_input_tensors(kind: str, tmp_path: Path) -> None:
    m: models.TestModel = getattr(models, kind)(tmp_path)
    feeds = [dict(zip(m.input_names, m.make_feed(i))) for i in range(20)]
    folder = save_feeds(tmp_path / "cal", feeds)
    cache = tmp_path / "cache"
    # A goal the plain w8a8 segments meet, so that they ship with their calibration sets.
    sess = session(m.path, cache, dtype="w8a8", calibration=str(folder), min_cosine="0.95")
    assert sess.get_providers() == [RKNN, CPU]
    stats = rkort.session_stats(sess)
    fresh = [dict(zip(m.input_names, m.make_feed(100 + i))) for i in range(4)]
    ref = ort.InferenceSession(str(m.path), providers=[CPU])
    for feed in fresh:
        for w, g in zip(ref.run(None, feed), sess.run(None, feed)):
            if w.dtype.kind == "f":
                assert cosine(w, g) >= 0.95
            else:
                np.testing.assert_array_equal(w, g)
    assert rkort.session_stats(sess)["cpu_calls"] == stats["cpu_calls"]
    metas = entries(cache)
    assert len(metas) >= 2  # several NPU segments, each with its own calibration
    for meta in metas:
        segment = meta["source"]["segment"]
        assert meta["source"]["kind"] == "segment" and meta["quantization"]["built"] == "w8a8"
        assert meta["quantization"]["cosine_min"] >= 0.95
        shapes = [tuple(s) for s in meta["source"]["spec"]["input_shapes"]]
        assert dataset_shapes(meta)[0] == shapes  # the segment's own inputs, not the model's
        assert segment["inputs"] == meta["source"]["spec"]["input_names"]
    assert any(set(meta["source"]["segment"]["inputs"]) - set(m.input_names) for meta in metas)


@needs_rknn
def test_recorded_feeds_calibrate(
    bert: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    caplog.set_level(logging.WARNING, logger="rkort")
    # Nothing recorded yet: the data is missing, which says so; no node is blamed for it.
    empty = session(
        bert, cache, dtype="w8a8", calibration="recorded", buckets="16", batch_buckets="1"
    )
    assert empty.get_providers() == [CPU]
    (warning,) = [r.getMessage() for r in caplog.records if "cannot run" in r.getMessage()]
    assert "CalibrationError" in warning and "record_inputs" in warning
    recording = session(bert, cache, record_inputs="12", buckets="16", batch_buckets="1")
    rng = np.random.default_rng(11)
    names = [i.name for i in recording.get_inputs()]
    for n in rng.integers(3, 16, 15):
        recording.run(None, token_feed(rng, int(n), names))
    kept = sorted((cache / "calibration").glob("*/feed-*.npz"))
    assert len(kept) == 12
    sess = session(
        bert, cache, dtype="w8a8", calibration="recorded", buckets="16", batch_buckets="1"
    )
    assert sess.get_providers() == [RKNN, CPU]
    (meta,) = [m for m in entries(cache) if m.get("quantization")]
    cal = meta["quantization"]["calibration"]
    assert "record_inputs" in cal["source"] and cal["samples"] + cal["held_out"] == 12
    assert_close_to_onnxruntime(bert, sess, [token_feed(rng, 9, names)], 0.99)


@needs_rknn
def test_optimum_passes_the_options_through(tmp_path: Path) -> None:
    task = "feature-extraction"
    onnx_dir = hf_models.export(
        hf_models.transformers_model(task, tmp_path / "hf"), tmp_path / "onnx", task
    )
    text = tmp_path / "cal.txt"
    rng = np.random.default_rng(12)
    text.write_text(
        "\n".join(
            " ".join(rng.choice(hf_models.WORDS, int(rng.integers(3, 14)))) for _ in range(20)
        )
    )
    options = {
        "dtype": "w8a8",
        "calibration_text": str(text),
        "tokenizer": str(tmp_path / "hf"),
        "buckets": "16",
        "batch_buckets": "1",
        "cache_dir": str(tmp_path / "cache"),
    }
    rkort.install()
    try:
        model = hf_models.optimum_class(task).from_pretrained(
            onnx_dir, provider="RKNN", provider_options=options
        )
    finally:
        uninstall()
    assert model.model.get_providers() == [RKNN, CPU]
    assert model.model.get_provider_options()[RKNN] == options
    tok = hf_models.tokenizer(tmp_path / "tok")
    out = model(**tok(["the cat sat on the mat"], return_tensors="np"))
    assert out.last_hidden_state.shape[:2] == (1, 8)
    (meta,) = entries(tmp_path / "cache")
    assert meta["quantization"]["calibration"]["source"].startswith("calibration_text=")


# -- the board ---------------------------------------------------------------------------------


@needs_rknn
def test_quantized_blobs_warmed_on_the_host_serve_the_board(tmp_path: Path) -> None:
    """The board app (tests/test_board.py) feeds ids and a mask: a DistilBERT encoder."""
    bert = export_encoder("distilbert", tmp_path, max_len=64)
    rng = np.random.default_rng(13)
    names = ["input_ids", "attention_mask"]
    bert_feeds = save_feeds(
        tmp_path / "cal", [token_feed(rng, int(n), names) for n in rng.integers(4, 31, 30)]
    )
    cache = tmp_path / "cache"
    done = rkort_cli(
        "warmup", str(bert), "-q", "--dtype", "w8a8", "--calibration", str(bert_feeds),
        "--buckets", "16,32", "--batch-buckets", "1", cache=cache,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("compiled") == 3  # two blobs and the total
    assert "cosine" in done.stdout and "held-out samples" in done.stdout
    options = {"dtype": "w8a8", "calibration": str(bert_feeds)}
    _, stats, outputs = rehearse(bert, cache, tmp_path / "out", (10, 25), options=options)
    assert stats["compiles"] == 0 and stats["blobs_loaded"] == 2
    assert stats["npu_calls"] == 2 and stats["cpu_calls"] == 0
    ref = ort.InferenceSession(str(bert), providers=[CPU])
    for n in (10, 25):
        ids = outputs[f"in{n}"]
        want = ref.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        assert cosine(want, outputs[f"out{n}"]) >= 0.99
    # `rkort check` says the same figures for the asked build, per output and per layer.
    check = rkort_cli(
        "check", str(bert), "--calibration", str(bert_feeds), "--buckets", "16",
        "--batch-buckets", "1", "--layers", cache=cache,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert "last_hidden_state" in check.stdout and "cosine" in check.stdout
    assert "layers (cosine to the float model" in check.stdout and "exNorm" in check.stdout
