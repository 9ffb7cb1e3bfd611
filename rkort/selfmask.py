"""A mask over the past for decoders exported without one: optimum's seq2seq decoders with a KV
cache (T5, BART, Marian, Whisper ``decoder_with_past_model.onnx``) take past keys/values of
length ``past`` and return ``present`` of ``past + new`` positions, but no attention mask over
them, so their past cannot be padded. rkort adds one: an input ``rkort_attention_mask``
``[batch, past + new]`` (1 keeps a position, 0 drops it) turned into an additive bias (0 or
-10000) before every self-attention Softmax (the ones whose last axis is ``past + new``, found by
shape inference). Fed all ones it computes what the model computes; with the past padded on the
left and those positions 0 it is a decoder whose KV cache :mod:`rkort.kvcache` can bucket.

Some of them (BART, Marian, Whisper) also count their new tokens' positions from the past's
length (``Range(past, past + new)`` indexing a position table): padded, the past would move them.
The copy takes those positions as a second input, ``rkort_positions`` ``[new]``, which the run
side computes from the past's real length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import default_opset, prepare, type_of
from .kvcache import find_layout

MASK_INPUT = "rkort_attention_mask"
POSITIONS_INPUT = "rkort_positions"
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
    positions: tuple[str, ...] = ()  # outputs of Range(past, past + new) indexing a table
    positions_type: int = TensorProto.INT64


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
        types = prepare(model, shapes)[1]
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
    ranges = _position_ranges(model, {n for n in names if n.startswith("past")})
    kinds = {types[r].elem_type for r in ranges if r in types and types[r].elem_type}
    return SelfMask(
        past,
        ids[1],
        total,
        ids[0],
        past_input,
        ids_input,
        tuple(found),
        ranges,
        kinds.pop() if len(kinds) == 1 else TensorProto.INT64,
    )


#: Ops a position index passes through on its way from its Range to the table it indexes.
_CARRY = {"Add", "Cast", "Expand", "Identity", "Reshape", "Squeeze", "Tile", "Unsqueeze"}
_WALK = 8


def _position_ranges(model: onnx.ModelProto, pasts: set[str]) -> tuple[str, ...]:
    """Outputs of the Range nodes whose start is read off a past input's shape and whose values
    index a constant table (positions counted from the past's length)."""
    made = {o: n for n in model.graph.node for o in n.output}

    def from_past(name: str, depth: int = 0) -> bool:
        node = made.get(name)
        if node is None or depth > _WALK:
            return False
        if node.op_type == "Shape":
            return node.input[0] in pasts
        return any(from_past(i, depth + 1) for i in node.input if i)

    return tuple(
        n.output[0]
        for n in model.graph.node
        if n.op_type == "Range" and from_past(n.input[0]) and _index_path(model.graph, n.output[0])
    )


def _index_path(graph: onnx.GraphProto, start: str) -> list[int]:
    """Indices of the nodes that carry ``start`` into a constant table's Gather (those
    Gathers included), in graph order; empty when it indexes none."""
    tables = {t.name for t in graph.initializer if len(t.dims) == 2}
    users: dict[str, list[int]] = {}
    for k, n in enumerate(graph.node):
        for i in n.input:
            users.setdefault(i, []).append(k)
    on_path: set[int] = set()

    def reaches(name: str, depth: int) -> bool:
        found = False
        for k in users.get(name, []) if depth <= _WALK else []:
            node = graph.node[k]
            if node.op_type == "Gather" and node.input[1] == name and node.input[0] in tables:
                on_path.add(k)
                found = True
            elif node.op_type in _CARRY and reaches(node.output[0], depth + 1):
                on_path.add(k)
                found = True
        return found

    reaches(start, 0)
    return sorted(on_path)


def _feed_positions(graph: onnx.GraphProto, ranges: Sequence[str]) -> None:
    """Index the position tables with the positions input instead of ``ranges``: the nodes on
    the way are copied (the Ranges' other users, such as a causal mask over the padded window,
    keep the past's padded length), the tables' Gathers replaced, and what no longer feeds
    anything dropped."""
    nodes = list(graph.node)
    for start in ranges:
        path = _index_path(graph, start)
        if not path:
            continue
        renamed = {start: POSITIONS_INPUT}
        copies = []
        for k in path:
            node = onnx.NodeProto()
            node.CopyFrom(nodes[k])
            node.name = f"{node.name}_rkort_positions"
            for j, name in enumerate(node.input):
                node.input[j] = renamed.get(name, name)
            if node.op_type != "Gather":
                renamed[node.output[0]] = f"{node.output[0]}_rkort_positions"
                node.output[0] = renamed[nodes[k].output[0]]
            copies.append(node)
        gathers = {k for k in path if nodes[k].op_type == "Gather"}
        first = min(gathers)
        nodes = [
            *[n for k, n in enumerate(nodes[:first]) if k not in gathers],
            *copies,
            *[n for k, n in enumerate(nodes[first:], first) if k not in gathers],
        ]
        del graph.node[:]
        graph.node.extend(nodes)
    _drop_unused(graph)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read (by a node or as a graph output)."""
    while True:
        read = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        kept = [n for n in graph.node if any(o in read for o in n.output if o)]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)


def with_mask(model: onnx.ModelProto, mask: SelfMask) -> onnx.ModelProto:
    """A copy of ``model`` with the mask input and its bias before each self-attention
    Softmax."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    batch = helper.make_tensor_value_info(MASK_INPUT, TensorProto.INT64, [mask.batch, mask.total])
    g.input.append(batch)
    if mask.positions:
        g.input.append(
            helper.make_tensor_value_info(POSITIONS_INPUT, mask.positions_type, [mask.sequence])
        )
        _feed_positions(g, mask.positions)
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


def added_inputs(arrays: Sequence[Any], ids: int, past: int, mask: SelfMask) -> list[Any]:
    """What a call feeds the copy besides the user's inputs, from its new tokens' ids and a past
    input (their indices in ``arrays``): the all-ones mask (every real position kept) and, where
    the copy takes them, the new tokens' positions after the past."""
    import numpy as np

    new, length = arrays[ids], arrays[past].shape[-2]
    added = [np.ones((new.shape[0], length + new.shape[1]), np.int64)]
    if mask.positions:
        dtype = helper.tensor_dtype_to_np_dtype(mask.positions_type)
        added.append(np.arange(length, length + new.shape[1], dtype=dtype))
    return added


def added_shapes(shapes: Mapping[str, Sequence[int]], mask: SelfMask) -> dict[str, tuple[int, ...]]:
    """The shapes of the copy's added inputs for a call of the model's own input ``shapes``."""
    ids, past = shapes[mask.ids_input], shapes[mask.past_input]
    added: dict[str, tuple[int, ...]] = {MASK_INPUT: (ids[0], past[-2] + ids[1])}
    if mask.positions:
        added[POSITIONS_INPUT] = (ids[1],)
    return added


def _f32(v: float) -> Any:
    import numpy as np

    return np.array(v, np.float32)


def _i64(v: list[int]) -> Any:
    import numpy as np

    return np.array(v, np.int64)


def _declared(value: onnx.ValueInfoProto) -> list[Any]:
    return list(type_of(value.type).shape or ())
