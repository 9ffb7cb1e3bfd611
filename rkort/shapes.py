"""Static shapes: the input signature a program is planned for, and the output shapes it implies.

Output shapes come one way: shape inference over the graph as planned for the signature
(:func:`rkort.graph.prepare`, which folds shape computations first); only where that cannot tell a
graph output's shape is the model run once on zeros by onnxruntime (:func:`probe_output_shapes`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from .graph import TensorType, infer_types, type_of

Signature = dict[str, tuple[int, ...]]
log = logging.getLogger("rkort")


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


#: Sizes the concrete tracing gives the input symbols: two sets, distinct within and across.
_TRACE_SIZES = ((37, 41, 43, 47, 53, 59, 61, 67), (71, 73, 79, 83, 89, 97, 101, 103))


def traced_output_dims(
    proto: onnx.ModelProto, input_dims: Mapping[str, Sequence[Any]]
) -> list[list[Any] | None]:
    """Each graph output's dims traced concretely: the graph planned (shapes folded) for two
    sets of sizes of its input symbols; a dim that follows one symbol in both is that symbol, one
    that stays put is that size, anything else unknown (None). For outputs whose declared dims
    name no input (optimum declares a decoder's ``present`` as ``past + new`` even where it has
    no past)."""
    from .graph import prepare

    symbols = list(
        dict.fromkeys(d for dims in input_dims.values() for d in dims if isinstance(d, str))
    )
    if len(symbols) > len(_TRACE_SIZES[0]):
        return [None] * len(proto.graph.output)
    runs = []
    for sizes in _TRACE_SIZES:
        size = dict(zip(symbols, sizes))
        shapes = {
            n: [d if isinstance(d, int) else size[d] for d in dims]
            for n, dims in input_dims.items()
        }
        types = prepare(proto, shapes)[1]
        runs.append(([types.get(o.name) for o in proto.graph.output], dict(zip(sizes, symbols))))
    result: list[list[Any] | None] = []
    (first, by_a), (second, by_b) = runs
    for ta, tb in zip(first, second):
        if ta is None or tb is None or ta.shape is None or tb.shape is None:
            result.append(None)
            continue
        dims: list[Any] = []
        for x, y in zip(ta.shape, tb.shape):
            if isinstance(x, int) and x == y:
                dims.append(x)
            elif isinstance(x, int) and isinstance(y, int) and x in by_a:
                dims.append(by_a[x] if by_a[x] == by_b.get(y) else None)
            else:
                dims.append(None)
        result.append(dims)
    return result


def output_dims_traced(
    model: Any, input_dims: Mapping[str, Sequence[Any]], output_dims: Sequence[Sequence[Any]]
) -> list[list[Any]]:
    """``output_dims`` with their unnamed or unknown dims filled from shape inference on the
    symbolic model, then from concrete tracing (``model`` has a ``proto``, read only when the
    declared output dims do not say it all)."""
    symbols = {d for dims in input_dims.values() for d in dims if isinstance(d, str)}
    dims_now = [list(ds) for ds in output_dims]

    def traced() -> bool:
        return all(isinstance(d, int) or d in symbols for ds in dims_now for d in ds)

    tracers = (
        lambda: symbolic_output_dims(model.proto),
        lambda: traced_output_dims(model.proto, input_dims),
    )
    for trace in tracers:
        if traced():
            break
        try:
            inferred = trace()
        except Exception:  # noqa: BLE001 - best effort; untraced dims disable padding
            log.debug("output dims not traced", exc_info=True)
            continue
        for i, dims in enumerate(dims_now):
            better = inferred[i] if i < len(inferred) else None
            if better is None or len(better) != len(dims):
                continue
            dims_now[i] = [
                b if (not isinstance(d, int) and d not in symbols and b is not None) else d
                for d, b in zip(dims, better)
            ]
    return dims_now
