"""Control flow as programs: the graph side. A top-level ``If`` whose condition is computed at run
time (from inputs, cheaply) splits a model into a *condition model* (only what the conditions
read) and one *branch model* per combination of branches: the model with each such ``If``
replaced by the nodes of its chosen branch. A branch model is an ordinary model (no ``If`` at its
top), so it is planned, compiled and cached like any other, by its own content.

Every function here is deterministic: the same model gives byte-identical branch models on every
machine, so a board finds the blobs a build host compiled for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import helper

from .graph import node_names, node_reads
from .inline import inline_body

#: At most this many runtime Ifs are split (2**N branch models).
MAX_IFS = 3
#: Ops whose presence in a condition's ancestry means the condition is not cheap: computing it
#: first on the CPU would do the network's own work twice.
HEAVY_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MatMul",
        "Gemm",
        "LSTM",
        "GRU",
        "RNN",
        "Attention",
        "MultiHeadAttention",
        "Einsum",
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
    }
)


@dataclass(frozen=True)
class Branching:
    """How a model splits: its runtime Ifs (by node name, in graph order), the value each reads
    as its condition, and why any other If stays whole."""

    ifs: tuple[str, ...]
    conditions: tuple[str, ...]
    reasons: tuple[str, ...] = ()


def branching(model: onnx.ModelProto) -> Branching:
    """The runtime Ifs of ``model`` that split it (none: the model runs as one program)."""
    graph = model.graph
    names = node_names(graph)
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    ifs: list[str] = []
    conditions: list[str] = []
    reasons: list[str] = []
    for name, node in zip(names, graph.node):
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            continue
        cond = node.input[0]
        if cond in constants:
            continue  # folded by the planner's constant folding
        heavy = sorted(
            {graph.node[i].op_type for i in _ancestors(graph, [cond], producers)} & HEAVY_OPS
        )
        if heavy:
            reasons.append(
                f"If '{name}': its condition is computed by the network itself ({', '.join(heavy)}),"
                " so choosing the branch first would run that work twice; it stays on the CPU"
            )
        elif len(ifs) >= MAX_IFS:
            reasons.append(f"If '{name}': more than {MAX_IFS} runtime Ifs; it stays on the CPU")
        else:
            ifs.append(name)
            conditions.append(cond)
    return Branching(tuple(ifs), tuple(conditions), tuple(reasons))


def _ancestors(
    graph: onnx.GraphProto, wanted: Iterable[str], producers: Mapping[str, int]
) -> list[int]:
    """Indices of the top-level nodes ``wanted`` values depend on, in graph order."""
    seen: set[int] = set()
    stack = [producers[v] for v in wanted if v in producers]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        stack.extend(producers[r] for r in node_reads(graph.node[i]) if r in producers)
    return sorted(seen)


def condition_model(model: onnx.ModelProto, split: Branching) -> onnx.ModelProto:
    """A model of only what the conditions read: its outputs are the conditions, in order."""
    graph = model.graph
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    keep = _ancestors(graph, split.conditions, producers)
    nodes = [graph.node[i] for i in keep]
    read = {r for n in nodes for r in node_reads(n)} | set(split.conditions)
    inputs = [i for i in graph.input if i.name in read]
    inits = [t for t in graph.initializer if t.name in read]
    outputs = [
        helper.make_tensor_value_info(c, onnx.TensorProto.BOOL, None) for c in split.conditions
    ]
    out = helper.make_graph(nodes, f"{graph.name}-conditions", inputs, outputs, inits)
    return _model_like(model, out)


def branch_model(
    model: onnx.ModelProto, split: Branching, choice: Sequence[bool]
) -> onnx.ModelProto:
    """``model`` with each If of ``split`` replaced by its then (True) or else (False) branch;
    inputs it no longer reads are dropped."""
    graph = model.graph
    chosen = dict(zip(split.ifs, choice))
    nodes: list[onnx.NodeProto] = []
    inits = list(graph.initializer)
    infos = list(graph.value_info)
    for name, node in zip(node_names(graph), graph.node):
        if name not in chosen:
            nodes.append(node)
            continue
        attr = "then_branch" if chosen[name] else "else_branch"
        body = next(a.g for a in node.attribute if a.name == attr)
        inl = inline_body(body, f"{name}/{attr}/")
        nodes.extend(inl.nodes)
        nodes.extend(
            helper.make_node("Identity", [src], [dst], name=f"{name}/{attr}/output_{k}")
            for k, (src, dst) in enumerate(zip(inl.outputs, node.output))
            if dst
        )
        inits.extend(inl.initializers)
        infos.extend(inl.value_info)
    # What only chose the branch (the conditions' own nodes) is not part of the branch.
    made = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needed: set[int] = set()
    stack = [made[o.name] for o in graph.output if o.name in made]
    while stack:
        i = stack.pop()
        if i not in needed:
            needed.add(i)
            stack.extend(made[r] for r in node_reads(nodes[i]) if r in made)
    nodes = [n for i, n in enumerate(nodes) if i in needed]
    read = {r for n in nodes for r in node_reads(n)} | {o.name for o in graph.output}
    inputs = [i for i in graph.input if i.name in read]
    inits = [t for t in inits if t.name in read]
    suffix = "".join("T" if c else "F" for c in choice)
    out = helper.make_graph(
        nodes, f"{graph.name}-{suffix}", inputs, list(graph.output), inits, value_info=infos
    )
    return _model_like(model, out)


def _model_like(model: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    out.producer_name = "rkort"
    return out
