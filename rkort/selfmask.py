"""A mask over the past for decoders exported without one: optimum's seq2seq decoders with a KV
cache (T5, BART, Marian, Whisper ``decoder_with_past_model.onnx``) take past keys/values of
length ``past`` and return ``present`` of ``past + new`` positions, but no attention mask over
them, so their past cannot be padded. rkort adds one: an input ``rkort_attention_mask``
``[batch, past + new]`` (1 keeps a position, 0 drops it) turned into an additive bias (0 or
-10000) before every self-attention Softmax (the ones whose last axis is ``past + new``, found by
shape inference). Fed all ones it computes what the model computes; with the past padded on the
left and those positions 0 it is a decoder whose KV cache :mod:`rkort.kvcache` can bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import default_opset, infer_types, type_of
from .kvcache import find_layout

MASK_INPUT = "rkort_attention_mask"
#: The bias of a dropped position, finite in float16 (as padding's additive masks).
DROP_BIAS = -10000.0
#: Probe sizes for finding the self-attention Softmaxes by their last axis.
_PROBE = {"past": 3, "new": 2, "other": 7}


@dataclass(frozen=True)
class SelfMask:
    """Where a decoder needs the mask: its symbols and its self-attention Softmax nodes."""

    past: str
    sequence: str
    total: str
    batch: str | int
    past_input: str  # an input with the past at axis -2
    ids_input: str  # the new tokens' ids
    softmaxes: tuple[str, ...]  # output names of the Softmax nodes that get the bias


def needs_mask(model: onnx.ModelProto) -> SelfMask | None:
    """The self-attention of a decoder with a KV cache and no mask over it, or None."""
    inputs = [
        i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    ]
    names = [i.name for i in inputs]
    dims = [_declared(i) for i in inputs]
    if find_layout(names, dims) is not None:
        return None  # it has a mask over past + new already
    pasts = {ds[-2] for n, ds in zip(names, dims) if n.startswith("past") and len(ds) >= 3} - {None}
    ids = next((ds for n, ds in zip(names, dims) if n in ("input_ids", "decoder_input_ids")), None)
    if not pasts or ids is None or len(ids) != 2 or not isinstance(ids[1], str):
        return None
    totals = [
        d
        for o in model.graph.output
        for d in _declared(o)
        if isinstance(d, str) and [p.strip() for p in d.split("+")] in ([q, ids[1]] for q in pasts)
    ]
    if not totals:
        return None
    total = totals[0]
    past = total.split("+")[0].strip()
    sizes = {past: _PROBE["past"], ids[1]: _PROBE["new"]}
    shapes = {
        n: [
            d if isinstance(d, int) else sizes.get(d, 1 if d == ids[0] else _PROBE["other"])
            for d in ds
        ]
        for n, ds in zip(names, dims)
    }
    try:
        types = infer_types(model, shapes)
    except Exception:  # noqa: BLE001 - no inference, no mask
        return None
    want = _PROBE["past"] + _PROBE["new"]
    found = []
    for node in model.graph.node:
        if node.op_type != "Softmax" or not node.input:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        t = types.get(node.input[0])
        if t is None or t.shape is None or len(t.shape) != 4 or axis not in (-1, 3):
            continue
        if t.shape[-1] == want:
            found.append(node.output[0])
    if not found:
        return None
    past_input = next(n for n, ds in zip(names, dims) if n.startswith("past") and ds[-2] == past)
    ids_input = next(n for n in names if n in ("input_ids", "decoder_input_ids"))
    return SelfMask(past, ids[1], total, ids[0], past_input, ids_input, tuple(found))


def with_mask(model: onnx.ModelProto, mask: SelfMask) -> onnx.ModelProto:
    """A copy of ``model`` with the mask input and its bias before each self-attention
    Softmax."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    batch = helper.make_tensor_value_info(MASK_INPUT, TensorProto.INT64, [mask.batch, mask.total])
    g.input.append(batch)
    prefix = "rkort_mask"
    opset = default_opset(model)
    g.initializer.extend(
        [
            numpy_helper.from_array(_f32(1.0), f"{prefix}_one"),
            numpy_helper.from_array(_f32(DROP_BIAS), f"{prefix}_drop"),
        ]
    )
    nodes = [
        helper.make_node("Cast", [MASK_INPUT], [f"{prefix}_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{prefix}_one", f"{prefix}_f"], [f"{prefix}_inv"]),
        helper.make_node("Mul", [f"{prefix}_inv", f"{prefix}_drop"], [f"{prefix}_bias2"]),
    ]
    if opset >= 13:
        g.initializer.append(
            numpy_helper.from_array(_i64([1, 2]), f"{prefix}_axes"),
        )
        nodes.append(
            helper.make_node("Unsqueeze", [f"{prefix}_bias2", f"{prefix}_axes"], [f"{prefix}_bias"])
        )
    else:
        nodes.append(
            helper.make_node("Unsqueeze", [f"{prefix}_bias2"], [f"{prefix}_bias"], axes=[1, 2])
        )
    for o in g.output:
        dims = o.type.tensor_type.shape.dim
        named = output_dims(o.name, [d.dim_param or d.dim_value for d in dims], mask)
        for d, n in zip(dims, named):
            if isinstance(n, str) and n != d.dim_param:
                d.dim_param = n
    rebuilt = list(nodes)
    targets = set(mask.softmaxes)
    for node in g.node:
        if node.op_type == "Softmax" and node.output[0] in targets:
            masked = f"{node.output[0]}_rkort_masked"
            rebuilt.append(
                helper.make_node(
                    "Add",
                    [node.input[0], f"{prefix}_bias"],
                    [masked],
                    name=f"{node.name}_rkort_mask",
                )
            )
            node.input[0] = masked
        rebuilt.append(node)
    del g.node[:]
    g.node.extend(rebuilt)
    return out


def output_dims(name: str, dims: Sequence[Any], mask: SelfMask) -> list[Any]:
    """An output's dims in the masked copy: optimum names the logits' new-token axis "1" in
    these exports, and it is the new tokens."""
    out = list(dims)
    if name == "logits" and len(out) == 3 and isinstance(out[1], str) and out[1].isdigit():
        out[1] = mask.sequence
    return out


def mask_for(arrays: Sequence[Any], ids: int, past: int) -> Any:
    """The all-ones mask of a call (every real position kept), from its new tokens' ids and a
    past input (their indices in ``arrays``)."""
    import numpy as np

    new = arrays[ids]
    return np.ones((new.shape[0], arrays[past].shape[-2] + new.shape[1]), np.int64)


def _f32(v: float) -> Any:
    import numpy as np

    return np.array(v, np.float32)


def _i64(v: list[int]) -> Any:
    import numpy as np

    return np.array(v, np.int64)


def _declared(value: onnx.ValueInfoProto) -> list[Any]:
    return list(type_of(value.type).shape or ())
