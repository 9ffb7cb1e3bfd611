"""Names and reads of nodes, as every room of rkort names them: a unique name per node, and the
values a node reads (its subgraphs' reads from the outer scope included)."""

from __future__ import annotations

import onnx

STANDARD_DOMAINS = ("", "ai.onnx")


def node_names(graph: onnx.GraphProto) -> list[str]:
    """A unique name for every node, in graph order: its own name, or ``<OpType>_<index>`` (made
    unique) for unnamed or duplicate ones. Everything in rkort names nodes this way."""
    taken = {n.name for n in graph.node if n.name}
    seen: set[str] = set()
    names = []
    for i, node in enumerate(graph.node):
        name = node.name
        if not name or name in seen:
            base = f"{node.op_type}_{i}"
            name, k = base, 1
            while name in taken or name in seen:
                name, k = f"{base}_{k}", k + 1
        seen.add(name)
        names.append(name)
    return names


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """Outer-scope values a node's subgraphs (If/Loop/Scan bodies) read."""
    found: list[str] = []
    for attr in node.attribute:
        graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for g in graphs:
            found.extend(_outer_refs(g))
    return found


def _outer_refs(graph: onnx.GraphProto) -> list[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    refs: list[str] = []
    for node in graph.node:
        for name in list(node.input) + subgraph_reads(node):
            if name and name not in defined and name not in refs:
                refs.append(name)
        defined.update(node.output)
    for o in graph.output:
        if o.name not in defined and o.name not in refs:
            refs.append(o.name)
    return refs


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads, its subgraphs' outer-scope reads included (no empty names)."""
    out: list[str] = []
    for name in list(node.input) + subgraph_reads(node):
        if name and name not in out:
            out.append(name)
    return out
