"""Control flow that one input signature settles, written out as dataflow the converter takes: an
If whose condition is a constant (often a test on a shape) becomes the nodes of the branch it
takes; a Loop with a constant trip count and no early exit, and a Scan over a static length,
become their iterations one after another (within a size limit). A graph so rewritten is marked
(:data:`INLINED`): it is no longer the model's own graph, so the model file cannot stand for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .inline import inline_body
from .nodes import STANDARD_DOMAINS, node_names

INLINED = "rkort:inlined"
#: A Loop or Scan is unrolled only up to this many iterations ...
MAX_TRIPS = 256
#: ... and this many nodes written out in all.
MAX_UNROLLED_NODES = 4096


def inline_control_flow(
    model: onnx.ModelProto, types: Mapping[str, Any] | None = None
) -> onnx.ModelProto | None:
    """A copy with every settled If, Loop and Scan written out, or None when there is none.
    ``types`` (value -> :class:`~rkort.graph.TensorType`) gives a Scan its length. Every node is
    named first (:func:`~rkort.nodes.node_names`), so no other node's name moves."""
    graph = model.graph
    values = _constants(graph)
    opset = next((int(i.version) for i in model.opset_import if i.domain in STANDARD_DOMAINS), 0)
    names = node_names(graph)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    changed = False
    for name, node in zip(names, graph.node):
        written = None
        if node.domain in STANDARD_DOMAINS:
            if node.op_type == "If":
                written = _if(node, name, values)
            elif node.op_type == "Loop":
                written = _loop(node, name, values, opset)
            elif node.op_type == "Scan":
                written = _scan(node, name, types or {}, opset)
        if written is None:
            kept = out.graph.node.add()
            kept.CopyFrom(node)
            kept.name = name
            continue
        changed = True
        nodes, inits, infos = written
        out.graph.node.extend(nodes)
        out.graph.initializer.extend(inits)
        out.graph.value_info.extend(infos)
    if not changed:
        return None
    if not any(p.key == INLINED for p in out.metadata_props):
        out.metadata_props.add(key=INLINED, value="1")
    return out


Written = tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[onnx.ValueInfoProto]]


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values: dict[str, np.ndarray] = {}
    for t in graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and math.prod(t.dims) == 1:
            values[t.name] = numpy_helper.to_array(t)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _scalar(values: Mapping[str, np.ndarray], name: str) -> Any:
    v = values.get(name)
    return v.reshape(()).item() if v is not None and v.size == 1 else None


def _if(node: onnx.NodeProto, name: str, values: Mapping[str, np.ndarray]) -> Written | None:
    cond = _scalar(values, node.input[0])
    if cond is None:
        return None
    attr = "then_branch" if cond else "else_branch"
    body = next(a.g for a in node.attribute if a.name == attr)
    inl = inline_body(body, f"{name}/{attr}/")
    nodes = inl.nodes + [
        helper.make_node("Identity", [src], [dst], name=f"{name}/{attr}/output_{k}")
        for k, (src, dst) in enumerate(zip(inl.outputs, node.output))
        if dst
    ]
    return nodes, inl.initializers, inl.value_info


def _loop(
    node: onnx.NodeProto, name: str, values: Mapping[str, np.ndarray], opset: int
) -> Written | None:
    """A Loop of a constant trip count whose condition stays true, written out."""
    body = next(a.g for a in node.attribute if a.name == "body")
    trips = _scalar(values, node.input[0]) if node.input and node.input[0] else None
    cond = node.input[1] if len(node.input) > 1 else ""
    if (
        not isinstance(trips, int)
        or not 0 < trips <= MAX_TRIPS
        or trips * len(body.node) > MAX_UNROLLED_NODES
        or (cond and _scalar(values, cond) is not True)
        or not _keeps_going(body)
    ):
        return None
    carried = list(node.input[2:])
    n = len(carried)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    infos: list[onnx.ValueInfoProto] = []
    scans: list[list[str]] = [[] for _ in body.output[1 + n :]]
    for k in range(trips):
        prefix = f"{name}/iter{k}/"
        bound = {body.input[j + 2].name: carried[j] for j in range(n)}
        bound[body.input[0].name] = _const(nodes, prefix + "iteration", np.array(k, np.int64))
        bound[body.input[1].name] = _const(nodes, prefix + "condition", np.array(True))
        inl = inline_body(body, prefix, bound)
        nodes += inl.nodes
        inits += inl.initializers
        infos += inl.value_info
        carried = inl.outputs[1 : 1 + n]
        for j, v in enumerate(inl.outputs[1 + n :]):
            scans[j].append(v)
    _write_outputs(nodes, node, name, carried, scans, [0] * len(scans), opset)
    return nodes, inits, infos


def _keeps_going(body: onnx.GraphProto) -> bool:
    """True when the body's condition output is its condition input (or a constant true)."""
    cond_in, cond_out = body.input[1].name, body.output[0].name
    if cond_out == cond_in:
        return True
    for n in body.node:
        if cond_out in n.output:
            if n.op_type == "Identity" and n.input[0] == cond_in:
                return True
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                return bool(numpy_helper.to_array(n.attribute[0].t).all())
            return False
    return False


def _scan(node: onnx.NodeProto, name: str, types: Mapping[str, Any], opset: int) -> Written | None:
    """A Scan (opset 9 and later) over a sequence of static length, written out."""
    if opset < 9:
        return None
    attrs = {a.name: a for a in node.attribute}
    body = attrs["body"].g
    m = attrs["num_scan_inputs"].i
    n = len(node.input) - m
    k_out = len(body.output) - n
    in_axes = list(attrs["scan_input_axes"].ints) if "scan_input_axes" in attrs else [0] * m
    in_dirs = (
        list(attrs["scan_input_directions"].ints) if "scan_input_directions" in attrs else [0] * m
    )
    out_axes = list(attrs["scan_output_axes"].ints) if "scan_output_axes" in attrs else [0] * k_out
    out_dirs = (
        list(attrs["scan_output_directions"].ints)
        if "scan_output_directions" in attrs
        else [0] * k_out
    )
    scanned = list(node.input[n:])
    shapes = [getattr(types.get(s), "static_shape", None) for s in scanned]
    if not scanned or any(s is None for s in shapes):
        return None
    lengths = {
        int(shape[a if a >= 0 else a + len(shape)])
        for shape, a in zip(shapes, in_axes)
        if shape is not None
    }
    if len(lengths) != 1:
        return None
    length = lengths.pop()
    if not 0 < length <= MAX_TRIPS or length * (len(body.node) + m) > MAX_UNROLLED_NODES:
        return None
    carried = list(node.input[:n])
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    infos: list[onnx.ValueInfoProto] = []
    outs: list[list[str]] = [[] for _ in range(k_out)]
    for t in range(length):
        prefix = f"{name}/iter{t}/"
        bound = {body.input[j].name: carried[j] for j in range(n)}
        for j, source in enumerate(scanned):
            index = t if not in_dirs[j] else length - 1 - t
            at = _const(nodes, f"{prefix}index_{j}", np.array(index, np.int64))
            element = f"{prefix}element_{j}"
            nodes.append(
                helper.make_node("Gather", [source, at], [element], name=element, axis=in_axes[j])
            )
            bound[body.input[n + j].name] = element
        inl = inline_body(body, prefix, bound)
        nodes += inl.nodes
        inits += inl.initializers
        infos += inl.value_info
        carried = inl.outputs[:n]
        for j, v in enumerate(inl.outputs[n:]):
            outs[j].append(v)
    ordered = [parts[::-1] if out_dirs[j] else parts for j, parts in enumerate(outs)]
    _write_outputs(nodes, node, name, carried, ordered, out_axes, opset)
    return nodes, inits, infos


def _const(nodes: list[onnx.NodeProto], name: str, value: np.ndarray) -> str:
    nodes.append(
        helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value))
    )
    return name


def _write_outputs(
    nodes: list[onnx.NodeProto],
    node: onnx.NodeProto,
    name: str,
    carried: Sequence[str],
    stacks: Sequence[Sequence[str]],
    axes: Sequence[int],
    opset: int,
) -> None:
    """A written-out Loop's or Scan's outputs: the final carried values, then each per-iteration
    output stacked along its axis."""
    outputs = list(node.output)
    n = len(carried)
    for j, v in enumerate(carried):
        if j < len(outputs) and outputs[j]:
            nodes.append(helper.make_node("Identity", [v], [outputs[j]], name=f"{name}/out_{j}"))
    for j, parts in enumerate(stacks):
        if n + j < len(outputs) and outputs[n + j]:
            _stack(nodes, parts, axes[j], outputs[n + j], f"{name}/scan_{j}", opset)


def _stack(
    nodes: list[onnx.NodeProto],
    parts: Sequence[str],
    axis: int,
    output: str,
    prefix: str,
    opset: int,
) -> None:
    """``output`` = the ``parts`` stacked along a new ``axis``."""
    expanded = []
    axes = _const(nodes, f"{prefix}/axes", np.array([axis], np.int64)) if opset >= 13 else None
    for k, part in enumerate(parts):
        name = f"{prefix}/unsqueeze_{k}"
        if axes is not None:
            nodes.append(helper.make_node("Unsqueeze", [part, axes], [name], name=name))
        else:
            nodes.append(helper.make_node("Unsqueeze", [part], [name], name=name, axes=[axis]))
        expanded.append(name)
    concat_axis = axis
    nodes.append(
        helper.make_node("Concat", expanded, [output], name=f"{prefix}/concat", axis=concat_axis)
    )
