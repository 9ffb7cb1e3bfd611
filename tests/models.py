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

from rkort.spec import BuildSpec

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


def spec_of(model: TestModel, **overrides: object) -> BuildSpec:
    """The BuildSpec of a whole test model (its declared static signature), with overrides."""
    fields: dict[str, object] = dict(
        model_path=str(model.path),
        input_names=model.input_names,
        input_shapes=model.input_shapes,
        input_dtypes=model.input_dtypes,
        output_names=model.output_names,
        output_shapes=model.output_shapes,
        output_dtypes=model.output_dtypes,
    )
    fields.update(overrides)
    return BuildSpec(**fields)  # type: ignore[arg-type]


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


# -- Models for placement and segments (issue 4) ---------------------------------------------------
#
# Each has NPU parts heavy enough (MatMuls of [1, 64, 128] x [128, 128], ~2 MFLOP each) that the
# planner keeps them on the NPU, around ops that must run on the CPU.

SEQ, WIDTH = 64, 128


def _matrix(rng: np.random.Generator, name: str, rows: int, cols: int) -> onnx.TensorProto:
    return numpy_helper.from_array(
        (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32), name
    )


def _const(name: str, value: object, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _float_model(
    name: str,
    directory: Path,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    out_shape: tuple[int, ...] = (1, SEQ, WIDTH),
    opset: int = OPSET,
    ir_version: int = 8,
) -> TestModel:
    in_shape = (1, SEQ, WIDTH)
    model = _graph_model(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        inits,
        opset=opset,
    )
    model.ir_version = ir_version
    return TestModel(
        name,
        _save(model, directory / f"{name}.onnx"),
        ("x",),
        (in_shape,),
        ("float32",),
        ("y",),
        (out_shape,),
        ("float32",),
        _float_feed((in_shape,)),
    )


def cpu_op_at(directory: Path, position: str) -> TestModel:
    """x[1, 64, 128] -> two MatMul layers with one CPU-only op at the ``position`` of the graph.

    start: Floor (the board runtimes lack it) on the input; middle: CumSum over the sequence (the
    runtimes lack it) between the layers; end: ReverseSequence (wrong on the NPU) on the output,
    which comes out [64, 1, 128] (time-major).
    """
    rng = np.random.default_rng(10)
    inits = [_matrix(rng, "w1", WIDTH, WIDTH), _matrix(rng, "w2", WIDTH, WIDTH)]
    layer1 = [
        helper.make_node("MatMul", ["a", "w1"], ["h"], name="layer1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
    ]
    out_shape: tuple[int, ...] = (1, SEQ, WIDTH)
    if position == "start":
        nodes = [
            helper.make_node("Mul", ["x", "four"], ["x4"], name="scale"),
            helper.make_node("Floor", ["x4"], ["xf"], name="floor"),
            helper.make_node("Mul", ["xf", "quarter"], ["a"], name="unscale"),
            *layer1,
            helper.make_node("MatMul", ["hr", "w2"], ["y"], name="layer2"),
        ]
        inits += [_const("four", 4.0), _const("quarter", 0.25)]
    elif position == "middle":
        nodes = [
            helper.make_node("Identity", ["x"], ["a"], name="input"),
            *layer1,
            helper.make_node("CumSum", ["hr", "axis"], ["c"], name="cumsum"),
            helper.make_node("Mul", ["c", "eighth"], ["cs"], name="damp"),
            helper.make_node("MatMul", ["cs", "w2"], ["y"], name="layer2"),
        ]
        inits += [_const("axis", 1, np.int64), _const("eighth", 0.125)]
    elif position == "end":
        nodes = [
            helper.make_node("Identity", ["x"], ["a"], name="input"),
            *layer1,
            helper.make_node("MatMul", ["hr", "w2"], ["z"], name="layer2"),
            helper.make_node("Transpose", ["z"], ["zt"], perm=[1, 0, 2], name="time_major"),
            helper.make_node(
                "ReverseSequence",
                ["zt", "lens"],
                ["y"],
                time_axis=0,
                batch_axis=1,
                name="reverse",
            ),
        ]
        inits += [_const("lens", [40], np.int64)]
        out_shape = (SEQ, 1, WIDTH)
    else:
        raise ValueError(f"position must be start, middle or end, not {position!r}")
    return _float_model(f"cpu_op_at_{position}", directory, nodes, inits, out_shape)


def cpu_islands(directory: Path) -> TestModel:
    """x[1, 64, 128] float32, ids[1, 64] int64 -> y[1, 64, 128], ids_mod[1, 64] int64,
    picked[2, N] int64: three MatMul layers with several CPU islands between them.

    CumSum (runtime lacks it), Mod on ints (runtime lacks it), ReverseSequence (wrong on the NPU)
    and NonZero (data-dependent shape, a graph output). ids_mod and picked never touch the NPU.
    """
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="layer1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("CumSum", ["r1", "axis"], ["c"], name="cumsum"),
        helper.make_node("Mul", ["c", "eighth"], ["cs"], name="damp"),
        helper.make_node("MatMul", ["cs", "w2"], ["h2"], name="layer2"),
        helper.make_node("Tanh", ["h2"], ["t2"], name="tanh2"),
        helper.make_node("Mod", ["ids", "seven"], ["ids_mod"], name="mod"),
        helper.make_node("Cast", ["ids_mod"], ["mf"], to=TensorProto.FLOAT, name="mod_float"),
        helper.make_node("Unsqueeze", ["mf", "last"], ["mu"], name="mod_column"),
        helper.make_node("Mul", ["mu", "tenth"], ["mt"], name="mod_scale"),
        helper.make_node("Add", ["t2", "mt"], ["h3"], name="mix"),
        helper.make_node("Transpose", ["h3"], ["ht"], perm=[1, 0, 2], name="time_major"),
        helper.make_node(
            "ReverseSequence", ["ht", "lens"], ["rv"], time_axis=0, batch_axis=1, name="reverse"
        ),
        helper.make_node("Transpose", ["rv"], ["rb"], perm=[1, 0, 2], name="batch_major"),
        helper.make_node("MatMul", ["rb", "w3"], ["y"], name="layer3"),
        helper.make_node("Greater", ["ids", "threshold"], ["big"], name="is_big"),
        helper.make_node("NonZero", ["big"], ["picked"], name="pick"),
    ]
    inits = [
        _matrix(rng, "w1", WIDTH, WIDTH),
        _matrix(rng, "w2", WIDTH, WIDTH),
        _matrix(rng, "w3", WIDTH, WIDTH),
        _const("axis", 1, np.int64),
        _const("eighth", 0.125),
        _const("seven", 7, np.int64),
        _const("last", [2], np.int64),
        _const("tenth", 0.1),
        _const("lens", [50], np.int64),
        _const("threshold", 900, np.int64),
    ]
    model = _graph_model(
        nodes,
        "cpu_islands",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, WIDTH]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, WIDTH]),
            helper.make_tensor_value_info("ids_mod", TensorProto.INT64, [1, SEQ]),
            helper.make_tensor_value_info("picked", TensorProto.INT64, [2, None]),
        ],
        inits,
    )

    def feed(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [
            rng.standard_normal((1, SEQ, WIDTH)).astype(np.float32),
            rng.integers(0, 1000, size=(1, SEQ), dtype=np.int64),
        ]

    return TestModel(
        "cpu_islands",
        _save(model, directory / "cpu_islands.onnx"),
        ("x", "ids"),
        ((1, SEQ, WIDTH), (1, SEQ)),
        ("float32", "int64"),
        ("y", "ids_mod", "picked"),
        ((1, SEQ, WIDTH), (1, SEQ), (2, -1)),
        ("float32", "int64", "int64"),
        feed,
    )


def control_flow(directory: Path) -> TestModel:
    """x[1, 64, 128] -> MatMul -> If (runtime condition: the sign of the mean) -> Loop (3 times
    Tanh) -> MatMul -> y. Feeds of opposite sign take opposite branches."""
    rng = np.random.default_rng(12)
    shape = [1, SEQ, WIDTH]
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["pos"])],
        "then",
        [],
        [helper.make_tensor_value_info("pos", TensorProto.FLOAT, shape)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["h", "half"], ["neg"])],
        "else",
        [],
        [helper.make_tensor_value_info("neg", TensorProto.FLOAT, shape)],
    )
    body = helper.make_graph(
        [
            helper.make_node("Tanh", ["v"], ["v_next"]),
            helper.make_node("Identity", ["keep"], ["keep_next"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("keep", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, shape),
        ],
        [
            helper.make_tensor_value_info("keep_next", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_next", TensorProto.FLOAT, shape),
        ],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="layer1"),
        helper.make_node("ReduceMean", ["h"], ["mean"], keepdims=0, name="mean"),
        helper.make_node("Greater", ["mean", "zero"], ["positive"], name="sign"),
        helper.make_node(
            "If", ["positive"], ["k"], then_branch=then_branch, else_branch=else_branch, name="if"
        ),
        helper.make_node("Loop", ["trips", "true", "k"], ["l"], body=body, name="loop"),
        helper.make_node("MatMul", ["l", "w2"], ["y"], name="layer2"),
    ]
    inits = [
        _matrix(rng, "w1", WIDTH, WIDTH),
        _matrix(rng, "w2", WIDTH, WIDTH),
        _const("half", 0.5),
        _const("zero", 0.0),
        _const("trips", 3, np.int64),
        _const("true", True, np.bool_),
    ]
    return _float_model("control_flow", directory, nodes, inits)


def opset20_gelu(directory: Path) -> TestModel:
    """x[1, 64, 128] -> MatMul -> Gelu (new in opset 20; no opset-19 form) -> MatMul -> y."""
    rng = np.random.default_rng(13)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="layer1"),
        helper.make_node("Gelu", ["h"], ["g"], name="gelu"),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="layer2"),
    ]
    inits = [_matrix(rng, "w1", WIDTH, WIDTH), _matrix(rng, "w2", WIDTH, WIDTH)]
    return _float_model("opset20_gelu", directory, nodes, inits, opset=20, ir_version=9)


def opset21_mlp(directory: Path) -> TestModel:
    """x[1, 64, 128] -> MatMul -> Add -> Relu -> Reshape/Transpose (heads) -> MatMul -> y at opset
    21 (IR 10): onnx's version converter takes it to opset 19 and it runs whole on the NPU."""
    rng = np.random.default_rng(14)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="layer1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu1"),
        helper.make_node("Reshape", ["r", "heads"], ["rh"], name="split_heads"),
        helper.make_node("Transpose", ["rh"], ["rt"], perm=[0, 2, 1, 3], name="heads_first"),
        helper.make_node("Transpose", ["rt"], ["rb"], perm=[0, 2, 1, 3], name="heads_back"),
        helper.make_node("Reshape", ["rb", "merged"], ["rm"], name="merge_heads"),
        helper.make_node("MatMul", ["rm", "w2"], ["y"], name="layer2"),
    ]
    inits = [
        _matrix(rng, "w1", WIDTH, WIDTH),
        _const("b1", rng.standard_normal(WIDTH) * 0.1),
        _const("heads", [1, SEQ, 2, WIDTH // 2], np.int64),
        _const("merged", [1, SEQ, WIDTH], np.int64),
        _matrix(rng, "w2", WIDTH, WIDTH),
    ]
    return _float_model("opset21_mlp", directory, nodes, inits, opset=21, ir_version=10)


def bert_with_cpu_op(directory: Path, seq: int = 32, external_data: bool = False) -> TestModel:
    """A 2-layer BertModel (random weights, hidden 128) exported at a static [1, seq] shape
    (opset 17), with a CumSum over the sequence (the board runtimes lack it) inserted after the
    first layer's output LayerNorm: -> last_hidden_state[1, seq, 128], pooler_output[1, 128]."""
    import warnings

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=4 * WIDTH,
        max_position_embeddings=128,
    )
    bert = BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.int64)
    exported = directory / "bert_export.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer chatter
        torch.onnx.export(
            bert,
            (ids, mask),
            str(exported),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state", "pooler_output"],
            opset_version=17,
            dynamo=False,
        )
    model = onnx.load(str(exported))
    graph = model.graph
    target = next(
        n.output[0]
        for n in graph.node
        if n.op_type == "LayerNormalization" and "layer.0/output" in n.name
    )
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == target:
                node.input[i] = "cumsum_scaled"
    at = next(i for i, n in enumerate(graph.node) if target in n.output) + 1
    graph.node.insert(
        at, helper.make_node("CumSum", [target, "cumsum_axis"], ["cumsum_out"], name="cumsum")
    )
    graph.node.insert(
        at + 1,
        helper.make_node("Mul", ["cumsum_out", "cumsum_scale"], ["cumsum_scaled"], name="damp"),
    )
    graph.initializer.extend([_const("cumsum_axis", 1, np.int64), _const("cumsum_scale", 1 / seq)])
    path = directory / ("bert_cpu_op_ext.onnx" if external_data else "bert_cpu_op.onnx")
    onnx.checker.check_model(model)
    if external_data:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            location=f"{path.stem}.data",
            size_threshold=1024,
        )
    else:
        onnx.save(model, str(path))

    def feed(s: int) -> list[np.ndarray]:
        rng = np.random.default_rng(s)
        mask = np.ones((1, seq), np.int64)
        mask[0, seq - 1 - s % 8 :] = 0
        return [rng.integers(0, config.vocab_size, (1, seq), dtype=np.int64), mask]

    return TestModel(
        path.stem,
        path,
        ("input_ids", "attention_mask"),
        ((1, seq), (1, seq)),
        ("int64", "int64"),
        ("last_hidden_state", "pooler_output"),
        ((1, seq, WIDTH), (1, WIDTH)),
        ("float32", "float32"),
        feed,
    )


def runtime_range(directory: Path, count: int = 8) -> TestModel:
    """x[1, 64, 128] float32, n int64 scalar -> y = x @ W, r = Range(0, n, 1) declared [count].

    The Range has a runtime input, which the converter refuses and names ("The input 1 of
    Range('range') need to be constant!")."""
    rng = np.random.default_rng(15)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["y"], name="layer1"),
        helper.make_node("Range", ["start", "n", "step"], ["r"], name="range"),
    ]
    inits = [
        _matrix(rng, "w1", WIDTH, WIDTH),
        _const("start", 0, np.int64),
        _const("step", 1, np.int64),
    ]
    model = _graph_model(
        nodes,
        "runtime_range",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, WIDTH]),
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, WIDTH]),
            helper.make_tensor_value_info("r", TensorProto.INT64, [count]),
        ],
        inits,
    )

    def feed(seed: int) -> list[np.ndarray]:
        x = np.random.default_rng(seed).standard_normal((1, SEQ, WIDTH)).astype(np.float32)
        return [x, np.array(count, np.int64)]

    return TestModel(
        "runtime_range",
        _save(model, directory / "runtime_range.onnx"),
        ("x", "n"),
        ((1, SEQ, WIDTH), ()),
        ("float32", "int64"),
        ("y", "r"),
        ((1, SEQ, WIDTH), (count,)),
        ("float32", "int64"),
        feed,
    )


def uint16_roundtrip(directory: Path) -> TestModel:
    """x[1, 64, 128] -> h = Relu(x @ W) * 100 -> Cast to uint16 and back -> y = h + 0.01 * that.

    The converter aborts on the uint16 tensor without naming a node ('Not Support Dtype: 4')."""
    rng = np.random.default_rng(16)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m"], name="layer1"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "hundred"], ["h"], name="scale"),
        helper.make_node("Cast", ["h"], ["u"], to=TensorProto.UINT16, name="to_u16"),
        helper.make_node("Cast", ["u"], ["f"], to=TensorProto.FLOAT, name="from_u16"),
        helper.make_node("Mul", ["f", "hundredth"], ["fs"], name="shrink"),
        helper.make_node("Add", ["h", "fs"], ["y"], name="mix"),
    ]
    inits = [_matrix(rng, "w1", WIDTH, WIDTH), _const("hundred", 100.0), _const("hundredth", 0.01)]
    return _float_model("uint16_roundtrip", directory, nodes, inits)
