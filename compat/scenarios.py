"""Scenarios for the differential conformance suite: a model and the calls made on it.

Each model is built here with onnx.helper (or ships inside onnxruntime). Every call is made on
onnxruntime and on rkort, and what comes back (outputs, or the exception's type and message) is
compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime.datasets
from onnx import TensorProto, helper

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def _model(nodes, inputs, outputs, initializers=(), opset=13, **kw) -> bytes:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _const(name: str, shape: tuple[int, ...], seed: int) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)


def mlp() -> bytes:
    """MatMul+Add+Relu+MatMul, static [2, 16] -> [2, 4]; carries metadata."""
    x = helper.make_tensor_value_info("X", F, [2, 16])
    y = helper.make_tensor_value_info("Y", F, [2, 4])
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h"]),
        helper.make_node("Add", ["h", "B1"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("MatMul", ["h3", "W2"], ["Y"]),
    ]
    inits = [_const("W1", (16, 32), 1), _const("B1", (32,), 2), _const("W2", (32, 4), 3)]
    graph = helper.make_graph(nodes, "mlp", [x], [y], inits, doc_string="a small MLP")
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13)],
        producer_name="rkort-compat",
        producer_version="1",
        domain="ai.rkort",
        model_version=7,
        doc_string="conformance model",
    )
    model.ir_version = 8
    helper.set_model_props(model, {"author": "rkort", "purpose": "compat"})
    return model.SerializeToString()


def two_in_two_out() -> bytes:
    """Two float inputs, two outputs: A+B and A*B, static [1, 3, 8, 8] (4-D: layout matters)."""
    a = helper.make_tensor_value_info("A", F, [1, 3, 8, 8])
    b = helper.make_tensor_value_info("B", F, [1, 3, 8, 8])
    s = helper.make_tensor_value_info("sum", F, [1, 3, 8, 8])
    p = helper.make_tensor_value_info("prod", F, [1, 3, 8, 8])
    return _model(
        [
            helper.make_node("Add", ["A", "B"], ["sum"]),
            helper.make_node("Mul", ["A", "B"], ["prod"]),
        ],
        [a, b],
        [s, p],
    )


def conv() -> bytes:
    """Conv+Relu+GlobalAveragePool on NCHW [1, 3, 16, 16]."""
    x = helper.make_tensor_value_info("image", F, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("features", F, [1, 8, 1, 1])
    return _model(
        [
            helper.make_node("Conv", ["image", "K", "KB"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["features"]),
        ],
        [x],
        [y],
        [_const("K", (8, 3, 3, 3), 4), _const("KB", (8,), 5)],
    )


def embedding() -> bytes:
    """int64 ids [1, 6] -> Gather from a table -> ReduceMean: an int64 input on the NPU path."""
    ids = helper.make_tensor_value_info("ids", I64, [1, 6])
    y = helper.make_tensor_value_info("pooled", F, [1, 16])
    return _model(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"]),
            helper.make_node("ReduceMean", ["e"], ["pooled"], axes=[1], keepdims=0),
        ],
        [ids],
        [y],
        [_const("table", (100, 16), 6)],
    )


def dynamic_batch() -> bytes:
    """A dynamic batch dim ['N', 4]: padded to a batch bucket on the NPU, sliced back."""
    x = helper.make_tensor_value_info("X", F, ["N", 4])
    y = helper.make_tensor_value_info("Y", F, ["N", 4])
    return _model([helper.make_node("Sigmoid", ["X"], ["Y"])], [x], [y])


def unknown_op() -> bytes:
    x = helper.make_tensor_value_info("X", F, [1])
    y = helper.make_tensor_value_info("Y", F, [1])
    graph = helper.make_graph(
        [helper.make_node("FooOp", ["X"], ["Y"], domain="com.foo")], "g", [x], [y]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.foo", 1)]
    )
    model.ir_version = 8
    return model.SerializeToString()


def example(name: str) -> Callable[[], str]:
    """A model that ships inside onnxruntime (its path)."""
    return lambda: onnxruntime.datasets.get_example(name)


@dataclass
class Call:
    """One run() call: a label, output names, and a feed built from a seeded generator."""

    label: str
    output_names: Any
    feed: Callable[[np.random.Generator], Any]


@dataclass
class Scenario:
    name: str
    model: Callable[[], Any]  # bytes or a path
    calls: list[Call] = field(default_factory=list)
    runs_on_rknn: bool = True  # False: the RKNN provider is expected to fall back to the CPU


def _f(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: rng.standard_normal(shape).astype(np.float32)


def _bad_feeds(
    name: str, shape: tuple[int, ...], extra: dict[str, Callable] | None = None
) -> list[Call]:
    """The mistakes a user makes with a single float input ``name`` of fixed ``shape``."""
    good = _f(*shape)
    other = dict(extra or {})

    def with_(value_fn: Callable) -> Callable:
        return lambda rng: {name: value_fn(rng), **{k: f(rng) for k, f in other.items()}}

    calls = [
        Call("good", None, with_(good)),
        Call("empty output list", [], with_(good)),
        Call("list input", None, with_(lambda rng: good(rng).tolist())),
        Call(
            "non-contiguous",
            None,
            with_(lambda rng: np.asfortranarray(good(rng)) if len(shape) > 1 else good(rng)),
        ),
        Call(
            "nan and inf",
            None,
            with_(
                lambda rng: np.where(
                    good(rng) > 1, np.nan, np.where(good(rng) < -1, np.inf, good(rng))
                ).astype(np.float32)
            ),
        ),
        Call("wrong dtype float64", None, with_(lambda rng: good(rng).astype(np.float64))),
        Call("wrong dtype int64", None, with_(lambda rng: good(rng).astype(np.int64))),
        Call("wrong dtype float16", None, with_(lambda rng: good(rng).astype(np.float16))),
        Call("wrong rank", None, with_(lambda rng: good(rng)[None])),
        Call(
            "wrong fixed dim",
            None,
            with_(lambda rng: rng.standard_normal((*shape[:-1], shape[-1] + 1)).astype(np.float32)),
        ),
        Call("string array", None, with_(lambda rng: np.full(shape, "a"))),
        Call("python scalar", None, with_(lambda rng: 1.0)),
        Call("numpy scalar", None, with_(lambda rng: np.float32(1.0))),
        Call("None value", None, with_(lambda rng: None)),
        Call(
            "unknown input name",
            None,
            lambda rng: {
                name: good(rng),
                "bogus": good(rng),
                **{k: f(rng) for k, f in other.items()},
            },
        ),
        Call("missing input", None, lambda rng: {k: f(rng) for k, f in other.items()}),
        Call("unknown output name", ["nope"], with_(good)),
        Call("feed is a list", None, lambda rng: [good(rng)]),
    ]
    return calls


def scenarios() -> list[Scenario]:
    mlp_calls = _bad_feeds("X", (2, 16)) + [
        Call("output by name", ["Y"], lambda rng: {"X": _f(2, 16)(rng)})
    ]
    tio = [
        Call(
            "both outputs", None, lambda rng: {"A": _f(1, 3, 8, 8)(rng), "B": _f(1, 3, 8, 8)(rng)}
        ),
        Call(
            "reversed outputs",
            ["prod", "sum"],
            lambda rng: {"A": _f(1, 3, 8, 8)(rng), "B": _f(1, 3, 8, 8)(rng)},
        ),
        Call(
            "repeated output",
            ["sum", "sum"],
            lambda rng: {"A": _f(1, 3, 8, 8)(rng), "B": _f(1, 3, 8, 8)(rng)},
        ),
        Call(
            "tuple of names",
            ("prod",),
            lambda rng: {"A": _f(1, 3, 8, 8)(rng), "B": _f(1, 3, 8, 8)(rng)},
        ),
    ] + _bad_feeds("A", (1, 3, 8, 8), {"B": _f(1, 3, 8, 8)})
    ids = lambda rng: rng.integers(0, 100, (1, 6)).astype(np.int64)  # noqa: E731
    emb = [
        Call("ids", None, lambda rng: {"ids": ids(rng)}),
        Call("ids as list", None, lambda rng: {"ids": ids(rng).tolist()}),
        Call("int32 ids", None, lambda rng: {"ids": ids(rng).astype(np.int32)}),
        Call("float ids", None, lambda rng: {"ids": ids(rng).astype(np.float32)}),
        Call("ids wrong length", None, lambda rng: {"ids": np.zeros((1, 7), np.int64)}),
    ]
    return [
        Scenario("mlp", mlp, mlp_calls),
        Scenario("two_in_two_out", two_in_two_out, tio),
        Scenario("conv", conv, _bad_feeds("image", (1, 3, 16, 16))),
        Scenario("embedding", embedding, emb),
        Scenario("ort_sigmoid", example("sigmoid.onnx"), _bad_feeds("x", (3, 4, 5))),
        Scenario("ort_mul_1", example("mul_1.onnx"), _bad_feeds("X", (3, 2))),
        Scenario(
            "ort_logreg_iris",
            example("logreg_iris.onnx"),
            [Call("good", None, lambda rng: {"float_input": _f(3, 2)(rng)})],
            runs_on_rknn=False,
        ),
        Scenario(
            "dynamic_batch",
            dynamic_batch,
            [Call(f"batch {n}", None, lambda rng, n=n: {"X": _f(n, 4)(rng)}) for n in (1, 3, 0)],
        ),
    ]
