"""Static shapes: the input signature a program is planned for, and the output shapes it implies.

Output shapes come one way: shape inference over the graph as planned for the signature
(:func:`rkort.graph.prepare`, which folds shape computations first); only where that cannot tell a
graph output's shape is the model run once on zeros by onnxruntime (:func:`probe_output_shapes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from .graph import TensorType, infer_types, type_of

Signature = dict[str, tuple[int, ...]]


def declared_types(proto: onnx.ModelProto) -> dict[str, TensorType]:
    """The declared type and shape of every graph input and output."""
    return {vi.name: type_of(vi.type) for vi in [*proto.graph.input, *proto.graph.output]}


def input_names(proto: onnx.ModelProto) -> tuple[str, ...]:
    """The graph's real inputs (initializers listed as inputs are left out)."""
    initializers = {t.name for t in proto.graph.initializer}
    return tuple(i.name for i in proto.graph.input if i.name not in initializers)


def signature_of(
    proto: onnx.ModelProto, given: Mapping[str, Sequence[int]], *, fill: int | None = None
) -> Signature:
    """Every input's static shape: ``given`` ones (checked against the declared dims), declared
    static ones, and with ``fill`` dynamic dims taken as that size; else a ValueError names the
    input that still has a dynamic shape."""
    names = input_names(proto)
    unknown = set(given) - set(names)
    if unknown:
        raise ValueError(f"no input named {sorted(unknown)}; the inputs are {list(names)}")
    declared = declared_types(proto)
    shapes: Signature = {}
    for name in names:
        d = declared[name]
        if name in given:
            shape = tuple(int(x) for x in given[name])
            if d.shape is not None and (
                len(d.shape) != len(shape)
                or any(isinstance(a, int) and a != b for a, b in zip(d.shape, shape))
            ):
                raise ValueError(
                    f"shape {list(shape)} does not fit input {name!r} of shape {list(d.shape)}"
                )
        elif d.static_shape is not None:
            shape = d.static_shape
        elif fill is not None and d.shape is not None:
            shape = tuple(x if isinstance(x, int) else fill for x in d.shape)
        else:
            raise ValueError(f"input {name!r} has dynamic shape {d.shape}; give its shape")
        shapes[name] = shape
    return shapes


def static_shape(types: Mapping[str, TensorType], name: str) -> tuple[int, ...] | None:
    """The static shape inference found for the value ``name``, if any."""
    t = types.get(name)
    return t.static_shape if t is not None else None


def probe_output_shapes(
    source: str | bytes, inputs: Mapping[str, tuple[Sequence[int], np.dtype]]
) -> list[tuple[int, ...]]:
    """Graph output shapes read off one onnxruntime run on zeros: the last resort when shape
    inference cannot tell them. ``inputs`` maps each input to its (shape, dtype)."""
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    sess = InferenceSession(source, providers=["CPUExecutionProvider"])
    feed = {name: np.zeros(shape, dtype) for name, (shape, dtype) in inputs.items()}
    return [tuple(o.shape) for o in sess.run(None, feed)]


def symbolic_output_dims(proto: onnx.ModelProto) -> list[list[Any] | None]:
    """Each graph output's dims by symbol (str), size (int) or unknown (None), from shape
    inference over the model with its inputs' declared (symbolic) dims."""
    types = infer_types(proto)
    result: list[list[Any] | None] = []
    for out in proto.graph.output:
        t = types.get(out.name)
        if t is None or t.shape is None:
            result.append(None)
            continue
        result.append(
            [None if isinstance(d, str) and d.startswith("unk__") else d for d in t.shape]
        )
    return result
