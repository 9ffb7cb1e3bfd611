"""Models quantized for onnxruntime, lowered by :func:`rkort.quantized.dequantize`: dynamic
(MatMulInteger, ConvInteger, quantized embeddings), static QDQ and QOperator models of a small MLP,
a small CNN and a small BERT, all made here by onnxruntime's own quantizer.

What is checked: the lowered graph is valid, keeps the model's outputs, holds no quantization op,
keeps node names, and the rules put >= 95 % of its FLOPs on the NPU; on the RKNN provider (host
simulator) its outputs match onnxruntime's outputs FOR THE QUANTIZED MODEL within that model's own
quantization error. The criterion, per sample (a batch row, or a token for BERT), in cosine
distances (1 - cosine similarity):

    distance(rknn, onnxruntime(quantized)) <= 2 * distance(onnxruntime(quantized), onnxruntime(fp32))
                                              + 0.001 (float16)

(the lowered model computes what the fp32 model computes with the quantized weights, so it sits
about as far from the quantized model as the fp32 model does), and a classifier's labels are the
ones onnxruntime gives the quantized model. A lowering that dropped a Relu the quantizer folded
into a QuantizeLinear range is at a distance of about 0.5 here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rkort
import rkort.planner
from rkort import placement
from rkort.cache import Cache
from rkort.graph import node_names
from rkort.model import ModelSource
from rkort.options import RKNNOptions
from rkort.planner import Planner
from rkort.quantized import QUANT_OPS, dequantize
from tests.conftest import RKNN, needs_rknn
from tests.encoders import export_encoder

pytest.importorskip("onnxruntime.quantization")
pytest.importorskip("ml_dtypes")  # onnxruntime's quantizer needs it

FLOAT16_ALLOWANCE = 0.001

# name -> (fp32 model, how it is quantized)
VARIANTS = {
    "mlp-dynamic-int8": ("mlp", dict(kind="dynamic", weight_type="QInt8")),
    "mlp-dynamic-uint8-per-channel": (
        "mlp",
        dict(kind="dynamic", weight_type="QUInt8", per_channel=True),
    ),
    "cnn-dynamic-int8": ("cnn", dict(kind="dynamic", weight_type="QInt8")),
    "cnn-dynamic-uint8": ("cnn", dict(kind="dynamic", weight_type="QUInt8")),
    "bert-dynamic-int8": ("bert", dict(kind="dynamic", weight_type="QInt8")),
    "bert-dynamic-int8-per-channel": (
        "bert",
        dict(kind="dynamic", weight_type="QInt8", per_channel=True),
    ),
    "mlp-qdq": ("mlp", dict(kind="QDQ")),
    "cnn-qdq": ("cnn", dict(kind="QDQ")),
    "cnn-qdq-per-channel": ("cnn", dict(kind="QDQ", per_channel=True)),
    "bert-qdq-per-channel": ("bert", dict(kind="QDQ", per_channel=True)),
    "mlp-qoperator": ("mlp", dict(kind="QOperator")),
    "cnn-qoperator-per-channel": ("cnn", dict(kind="QOperator", per_channel=True)),
    "bert-qoperator": ("bert", dict(kind="QOperator")),
}
CLASSIFIERS = ("mlp", "cnn")


def mlp(path: Path) -> Path:
    """x[8, 64] -> MatMul 64x128 + Add -> Relu -> MatMul 128x10 + Add (10 classes)."""
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i, (a, b) in enumerate([(64, 128), (128, 10)]):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array((0.1 * rng.standard_normal(b)).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], ["y" if i else "a0"], name=f"add{i}"),
        ]
        if i == 0:
            nodes.append(helper.make_node("Relu", ["a0"], ["r0"], name="relu0"))
            prev = "r0"
    return _save(nodes, inits, [8, 64], [8, 10], path)


def cnn(path: Path) -> Path:
    """x[4, 3, 16, 16] -> Conv+Relu -> MaxPool -> Conv+Relu -> GlobalAveragePool -> Flatten ->
    Gemm (5 classes); the first nodes are unnamed."""
    rng = np.random.default_rng(1)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        scale = 1.0 / np.sqrt(np.prod(shape[1:])) if len(shape) > 1 else 0.1
        return numpy_helper.from_array(
            (scale * rng.standard_normal(shape)).astype(np.float32), name
        )

    inits = [
        weight("w1", 8, 3, 3, 3),
        weight("b1", 8),
        weight("w2", 16, 8, 3, 3),
        weight("b2", 16),
        weight("wf", 5, 16),
        weight("bf", 5),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node(
            "MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    return _save(nodes, inits, [4, 3, 16, 16], [4, 5], path)


def _save(nodes: list, inits: list, x: list[int], y: list[int], path: Path) -> Path:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def feeds(base: str, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if base == "bert":
        return {
            "input_ids": rng.integers(1, 1000, (1, 16)).astype(np.int64),
            "attention_mask": np.ones((1, 16), np.int64),
            "token_type_ids": np.zeros((1, 16), np.int64),
        }
    shape = (8, 64) if base == "mlp" else (4, 3, 16, 16)
    return {"x": rng.standard_normal(shape).astype(np.float32)}


class _Calibration:
    """What onnxruntime's static quantizer reads: 16 random batches."""

    def __init__(self, base: str) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(
            [feeds(base, seed) for seed in range(100, 116)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize(source: Path, out: Path, base: str, kind: str, **options: object) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    weight_type = getattr(QuantType, str(options.pop("weight_type", "QInt8")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dynamic":
            quantize_dynamic(str(source), str(out), weight_type=weight_type, **options)  # type: ignore[arg-type]
        else:
            quantize_static(
                str(source),
                str(out),
                _Calibration(base),  # type: ignore[arg-type]
                quant_format=getattr(QuantFormat, kind),
                activation_type=QuantType.QUInt8,
                weight_type=weight_type,
                **options,  # type: ignore[arg-type]
            )
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path]]:  # type: ignore[no-untyped-def]
    """name -> (quantized model, its fp32 model), for every variant."""
    directory = tmp_path_factory.mktemp("quantized")
    bases = {
        "mlp": mlp(directory / "mlp.onnx"),
        "cnn": cnn(directory / "cnn.onnx"),
        "bert": export_encoder("bert", directory, max_len=32),
    }
    out = {}
    for name, (base, how) in VARIANTS.items():
        path = quantize(bases[base], directory / f"{name}.onnx", base, **dict(how))  # type: ignore[arg-type]
        out[name] = (path, bases[base])
    return out


@pytest.fixture(scope="module")
def lowered(built) -> dict[str, tuple[Path, str]]:  # type: ignore[no-untyped-def]
    """name -> (the lowered model's file, the note)."""
    out = {}
    for name, (path, _) in built.items():
        model, note = dequantize(onnx.load(str(path)))
        assert note is not None
        target = path.with_name(f"{path.stem}-lowered.onnx")
        onnx.save(model, str(target))
        out[name] = (target, note)
    return out


def _run(path: Path | str, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _rows(a: np.ndarray) -> np.ndarray:
    """One row per sample: a batch row, or a token of an encoder's output."""
    return a.reshape(-1, a.shape[-1]).astype(np.float64)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = _rows(a), _rows(b)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _check_within_own_error(got: np.ndarray, name: str, built) -> None:  # type: ignore[no-untyped-def]
    quantized, fp32 = built[name]
    feed = feeds(VARIANTS[name][0])
    want, reference = _run(quantized, feed), _run(fp32, feed)
    own, distance = 1 - _cosines(want, reference), 1 - _cosines(got, want)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.all(distance <= 2 * own + FLOAT16_ALLOWANCE), (distance.max(), own.max())
    if VARIANTS[name][0] in CLASSIFIERS:
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


# -- the lowered graph --


@pytest.mark.parametrize("name", VARIANTS)
def test_lowered_graph_is_valid_float_and_keeps_the_interface(name, built, lowered) -> None:  # type: ignore[no-untyped-def]
    original = onnx.load(str(built[name][0]))
    model = onnx.load(str(lowered[name][0]))
    onnx.checker.check_model(model, full_check=True)
    assert [n for n in model.graph.node if n.op_type in QUANT_OPS] == []
    assert list(model.graph.output) == list(original.graph.output)
    assert list(model.graph.input) == list(original.graph.input)
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    # Nodes the rewrite kept keep the names rkort knew them by (unnamed ones too).
    known = {
        (n.op_type, tuple(n.output)): k
        for n, k in zip(original.graph.node, node_names(original.graph))
    }
    for node in model.graph.node:
        key = (node.op_type, tuple(node.output))
        if key in known:
            assert node.name == known[key]


@pytest.mark.parametrize("name", VARIANTS)
def test_lowered_model_matches_the_quantized_model_on_onnxruntime(name, built, lowered) -> None:  # type: ignore[no-untyped-def]
    """The lowered graph on onnxruntime: within the quantized model's own error already (the
    NPU adds only float16 rounding to this)."""
    got = _run(lowered[name][0], feeds(VARIANTS[name][0]))
    _check_within_own_error(got, name, built)


@pytest.mark.parametrize("name", VARIANTS)
def test_rules_put_the_lowered_model_on_the_npu(name, built, lowered) -> None:  # type: ignore[no-untyped-def]
    shapes = {k: v.shape for k, v in feeds(VARIANTS[name][0]).items()}
    before = placement.plan(onnx.load(str(built[name][0])), "rk3588", input_shapes=shapes)
    after = placement.plan(onnx.load(str(lowered[name][0])), "rk3588", input_shapes=shapes)
    # Without the lowering: most work on the CPU, or the NPU's work cut by CPU islands.
    assert (before.npu_flop_share or 0.0) < 0.5 or len(before.segments) > 1
    assert after.npu_flop_share is not None and after.npu_flop_share >= 0.95
    assert len(after.segments) == 1
    quant_reasons = ("uint8", "int8", "standard ONNX domain")
    assert [
        (p.node_name, p.reason)
        for p in after.placements
        if p.device == placement.CPU and any(r in p.reason for r in quant_reasons)
    ] == []


def test_notes_say_what_was_lowered(lowered) -> None:  # type: ignore[no-untyped-def]
    assert "MatMulInteger" in lowered["mlp-dynamic-int8"][1]
    assert "ConvInteger" in lowered["cnn-dynamic-int8"][1]
    assert "Gather + DequantizeLinear" in lowered["bert-dynamic-int8"][1]
    assert "Clip" in lowered["cnn-qdq"][1] and "DequantizeLinear (weights)" in lowered["cnn-qdq"][1]
    assert "QLinearConv" in lowered["cnn-qoperator-per-channel"][1]
    assert "QLinearMatMul" in lowered["mlp-qoperator"][1]
    assert "Gather + DequantizeLinear" in lowered["bert-qoperator"][1]
    assert all("left as they are" not in note for _, note in lowered.values())


def test_replacements_take_the_replaced_nodes_names(lowered) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(lowered["mlp-dynamic-int8"][0]))
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops == {
        "mm0_quant": "MatMul",
        "add0": "Add",
        "relu0": "Relu",
        "mm1_quant": "MatMul",
        "add1": "Add",
    }


def test_a_float_model_is_left_alone(built) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(built["mlp-qdq"][1]))
    assert dequantize(model) == (model, None)


def test_per_channel_activation_quantization_stays_as_it_is() -> None:
    scale = numpy_helper.from_array(np.full(3, 0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.zeros(3, np.uint8), "z")
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], axis=1),
            helper.make_node("Relu", ["d"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [scale, zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    same, note = dequantize(model)
    assert same is model and note is not None and "left as it is" in note


def test_external_weights_are_read_from_the_model_directory(built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    quantized = onnx.load(str(built["mlp-dynamic-int8"][0]))
    path = tmp_path / "external.onnx"
    onnx.save(
        quantized, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    model = onnx.load(str(path), load_external_data=False)
    same, note = dequantize(model)
    assert same is model and note is not None and "external files" in note
    lowered, note = dequantize(model, base_dir=tmp_path)
    assert note is not None and "MatMulInteger" in note
    kept = {t.name: t for t in lowered.graph.initializer}
    assert kept["b0"].data_location == TensorProto.EXTERNAL  # untouched weights stay where they are
    out = tmp_path / "lowered.onnx"
    onnx.save(lowered, str(out))
    _check_within_own_error(_run(out, feeds("mlp")), "mlp-dynamic-int8", built)


def test_planner_places_the_lowered_file_on_the_npu(lowered, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = lowered["bert-dynamic-int8"][0]
    planner = Planner(
        ModelSource(path),
        RKNNOptions.parse({"target": "rk3588"}),
        Cache(tmp_path / "cache"),
        tmp_path,
    )
    plan = planner.place({k: v.shape for k, v in feeds("bert").items()})
    assert plan.npu_flop_share is not None and plan.npu_flop_share >= 0.95


# -- on the NPU (host simulator) --


def _rknn(path: Path, cache: Path) -> rkort.InferenceSession:
    return rkort.InferenceSession(
        str(path),
        providers=[(RKNN, {"cache_dir": str(cache)}), "CPUExecutionProvider"],
    )


@needs_rknn
@pytest.mark.parametrize("name", VARIANTS)
def test_rknn_matches_the_quantized_model_within_its_own_error(
    name, built, lowered, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    session = _rknn(lowered[name][0], tmp_path)
    got = session.run(None, feeds(VARIANTS[name][0]))[0]
    assert session.get_providers()[0] == RKNN
    stats = rkort.session_stats(session)
    assert stats["npu_calls"] == 1 and stats["cpu_calls"] == 0
    _check_within_own_error(got, name, built)


@needs_rknn
@pytest.mark.parametrize("name", ["cnn-dynamic-int8", "bert-dynamic-int8", "cnn-qdq"])
def test_a_quantized_model_file_runs_on_the_npu(name, built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through the public API on the quantized file itself, once the planner lowers models."""
    if not hasattr(rkort.planner, "dequantize"):
        pytest.skip("the planner does not lower quantized models yet")
    session = _rknn(built[name][0], tmp_path)
    got = session.run(None, feeds(VARIANTS[name][0]))[0]
    assert session.get_providers()[0] == RKNN
    assert rkort.session_stats(session)["npu_calls"] == 1
    _check_within_own_error(got, name, built)
