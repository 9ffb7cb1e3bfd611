"""Inlining a subgraph (an If branch, one iteration of a Loop or Scan body) into the graph that
holds it: its nodes, initializers and value types, with every name it defines prefixed so that
none clashes with the graph it joins (subgraphs nested in it that read those names are renamed
too), and its formal inputs bound to values of that graph."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx


@dataclass
class Inlined:
    """A subgraph made part of an outer graph; ``outputs`` are the outer names of its outputs."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    value_info: list[onnx.ValueInfoProto]
    outputs: list[str]


def inline_body(
    body: onnx.GraphProto, prefix: str, bound: Mapping[str, str] | None = None
) -> Inlined:
    """``body``'s nodes with the names it defines prefixed by ``prefix`` and its inputs replaced
    by the outer values ``bound`` gives for them (an If branch has no inputs)."""
    local = {t.name for t in body.initializer} | {o for n in body.node for o in n.output if o}
    rename = {n: prefix + n for n in local}
    rename.update(bound or {})
    nodes = []
    for k, node in enumerate(body.node):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = prefix + (copy.name or f"{copy.op_type}_{k}")
        _rename_node(copy, rename)
        nodes.append(copy)
    inits = []
    for t in body.initializer:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(t)
        tensor.name = rename[t.name]
        inits.append(tensor)
    infos = []
    for v in body.value_info:
        if v.name in local:
            info = onnx.ValueInfoProto()
            info.CopyFrom(v)
            info.name = rename[v.name]
            infos.append(info)
    outputs = [rename.get(o.name, o.name) for o in body.output]
    return Inlined(nodes, inits, infos, outputs)


def _rename_node(node: onnx.NodeProto, rename: Mapping[str, str]) -> None:
    """Rename what ``node`` reads and writes, and what its own subgraphs read from outside them
    (a name a subgraph defines itself shadows the outer one)."""
    for i, name in enumerate(node.input):
        if name in rename:
            node.input[i] = rename[name]
    for i, name in enumerate(node.output):
        if name in rename:
            node.output[i] = rename[name]
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            _rename_outer(g, rename)


def _rename_outer(graph: onnx.GraphProto, rename: Mapping[str, str]) -> None:
    defined = (
        {i.name for i in graph.input}
        | {t.name for t in graph.initializer}
        | {o for n in graph.node for o in n.output if o}
    )
    inner = {k: v for k, v in rename.items() if k not in defined}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in inner:
                node.input[i] = inner[name]
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_outer(g, inner)
    for o in graph.output:
        if o.name in inner:
            o.name = inner[o.name]
