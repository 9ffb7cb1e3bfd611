"""Small ONNX models built with onnx.helper, shared by the tests.

Each builder writes ``<dir>/<name>.onnx`` and returns a :class:`TestModel` with the model's path, its
static input/output signature and a function that makes a deterministic feed for it. Weights are
seeded so every run builds the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass(frozen=True)
class TestModel:
    __test__ = False  # not a pytest test class

    name: str
    path: Path
    input_names: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[str, ...]
    make_feed: Callable[[int], list[np.ndarray]]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _graph_model(
    nodes: list[onnx.NodeProto],
    name: str,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
    opset: int = OPSET,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _weights(
    rng: np.random.Generator, name: str, *shape: int, scale: float = 0.3
) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _float_feed(shapes: tuple[tuple[int, ...], ...]) -> Callable[[int], list[np.ndarray]]:
    def feed(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(s).astype(np.float32) for s in shapes]

    return feed


def mlp(
    directory: Path, batch: int = 2, features: int = 16, hidden: int = 32, out: int = 8
) -> TestModel:
    """x[batch, features] float32 -> Gemm -> Relu -> Gemm -> y[batch, out]."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"]),
    ]
    inits = [
        _weights(rng, "w1", features, hidden),
        _weights(rng, "b1", hidden),
        _weights(rng, "w2", hidden, out),
        _weights(rng, "b2", out),
    ]
    model = _graph_model(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out])],
        inits,
    )
    in_shapes = ((batch, features),)
    return TestModel(
        "mlp",
        _save(model, directory / "mlp.onnx"),
        ("x",),
        in_shapes,
        ("float32",),
        ("y",),
        ((batch, out),),
        ("float32",),
        _float_feed(in_shapes),
    )


def conv_relu(directory: Path, channels: int = 3, size: int = 8, filters: int = 4) -> TestModel:
    """image[1, C, H, W] float32 (NCHW) -> Conv 3x3 pad 1 -> Relu -> features[1, F, H, W].

    H != W and C != F on purpose, so an NHWC/NCHW mix-up changes the result or the shape.
    """
    rng = np.random.default_rng(2)
    height, width = size, size + 2
    nodes = [
        helper.make_node(
            "Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]
        ),
        helper.make_node("Relu", ["c"], ["features"]),
    ]
    inits = [_weights(rng, "w", filters, channels, 3, 3), _weights(rng, "b", filters)]
    in_shape = (1, channels, height, width)
    out_shape = (1, filters, height, width)
    model = _graph_model(
        nodes,
        "conv_relu",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, list(out_shape))],
        inits,
    )
    return TestModel(
        "conv_relu",
        _save(model, directory / "conv_relu.onnx"),
        ("image",),
        (in_shape,),
        ("float32",),
        ("features",),
        (out_shape,),
        ("float32",),
        _float_feed((in_shape,)),
    )


def embedding(directory: Path, vocab: int = 40000, dim: int = 8, seq: int = 6) -> TestModel:
    """ids[1, seq] int64 -> Gather(table) -> MatMul -> hidden[1, seq, dim] float32.

    The vocabulary is larger than int16 can index, and every feed holds ids >= 32768, so a
    runtime that narrows the ids gives a different answer.
    """
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
        helper.make_node("MatMul", ["emb", "proj"], ["hidden"]),
    ]
    inits = [_weights(rng, "table", vocab, dim, scale=1.0), _weights(rng, "proj", dim, dim)]
    model = _graph_model(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, seq, dim])],
        inits,
    )

    def feed(seed: int) -> list[np.ndarray]:
        ids = np.random.default_rng(seed).integers(0, vocab, size=(1, seq), dtype=np.int64)
        ids[0, 0] = vocab - 1 - seed
        return [ids]

    return TestModel(
        "embedding",
        _save(model, directory / "embedding.onnx"),
        ("ids",),
        ((1, seq),),
        ("int64",),
        ("hidden",),
        ((1, seq, dim),),
        ("float32",),
        feed,
    )


def two_in_two_out(directory: Path, features: int = 8) -> TestModel:
    """image[1, 2, 3, 4] float32 (4-D), b[1, F] float32 -> two outputs of different shapes.

    total[1, 4] = (Flatten(image)[:, :F] - b) @ W and gated[1, 2, 3, 4] = Sigmoid(image) * 2. The
    inputs have different ranks and the math is asymmetric in them, so a swapped input or output
    order, or a 4-D input read as NHWC, gives a different answer.
    """
    rng = np.random.default_rng(4)
    image_shape = (1, 2, 3, 4)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["head"]),
        helper.make_node("Sub", ["head", "b"], ["d"]),
        helper.make_node("MatMul", ["d", "w"], ["total"]),
        helper.make_node("Sigmoid", ["image"], ["s"]),
        helper.make_node("Mul", ["s", "two"], ["gated"]),
    ]
    inits = [
        _weights(rng, "w", features, 4),
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([features], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    shapes = (image_shape, (1, features))
    model = _graph_model(
        nodes,
        "two_in_two_out",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, list(image_shape)),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, features]),
        ],
        [
            helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("gated", TensorProto.FLOAT, list(image_shape)),
        ],
        inits,
    )
    return TestModel(
        "two_in_two_out",
        _save(model, directory / "two_in_two_out.onnx"),
        ("image", "b"),
        shapes,
        ("float32", "float32"),
        ("total", "gated"),
        ((1, 4), image_shape),
        ("float32", "float32"),
        _float_feed(shapes),
    )


def float16_io(directory: Path, features: int = 8) -> TestModel:
    """x[1, F] float16 -> Mul(2) -> Add(1) -> y[1, F] float16."""
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["m"]),
        helper.make_node("Add", ["m", "one"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.full((features,), 2.0, np.float16), "two"),
        numpy_helper.from_array(np.full((features,), 1.0, np.float16), "one"),
    ]
    model = _graph_model(
        nodes,
        "float16_io",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, features])],
        inits,
    )

    def feed(seed: int) -> list[np.ndarray]:
        return [np.random.default_rng(seed).standard_normal((1, features)).astype(np.float16)]

    return TestModel(
        "float16_io",
        _save(model, directory / "float16_io.onnx"),
        ("x",),
        ((1, features),),
        ("float16",),
        ("y",),
        ((1, features),),
        ("float16",),
        feed,
    )


def bool_mask(directory: Path, features: int = 8) -> TestModel:
    """x[1, F] float32, keep[1, F] bool -> Where(keep, x, 0) -> y[1, F]."""
    nodes = [helper.make_node("Where", ["keep", "x", "zero"], ["y"])]
    inits = [numpy_helper.from_array(np.zeros((1, features), np.float32), "zero")]
    model = _graph_model(
        nodes,
        "bool_mask",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features]),
            helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, features]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, features])],
        inits,
    )

    def feed(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [
            rng.standard_normal((1, features)).astype(np.float32),
            rng.integers(0, 2, size=(1, features)).astype(bool),
        ]

    return TestModel(
        "bool_mask",
        _save(model, directory / "bool_mask.onnx"),
        ("x", "keep"),
        ((1, features), (1, features)),
        ("float32", "bool"),
        ("y",),
        ((1, features),),
        ("float32",),
        feed,
    )


def nonzero(directory: Path) -> Path:
    """x[4] float32 -> NonZero: a data-dependent shape the converter refuses at build."""
    model = _graph_model(
        [helper.make_node("NonZero", ["x"], ["y"])],
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, None])],
        [],
    )
    return _save(model, directory / "nonzero.onnx")


def relu_opset20(directory: Path) -> Path:
    """A Relu at opset 20, which the converter refuses (it takes opset <= 19)."""
    model = _graph_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu20",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [],
        opset=20,
    )
    model.ir_version = 9
    return _save(model, directory / "relu_opset20.onnx")


#: Builders of the models every backend must run, by name.
RUNNABLE: dict[str, Callable[[Path], TestModel]] = {
    "mlp": mlp,
    "conv_relu": conv_relu,
    "embedding": embedding,
    "two_in_two_out": two_in_two_out,
    "float16_io": float16_io,
    "bool_mask": bool_mask,
}
