"""What a model costs: estimated FLOPs per node and parameter counts per device, from inferred
shapes (the figures `rkort inspect` and the placement of light work report)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import onnx

from .graph import TensorType, int_attr, node_names, node_reads, str_attr
from .rules import NPU, NodePlacement, constant_nodes
from .segments import Segment

# Ops that move or describe data without arithmetic (0 FLOPs in the estimate).
_ZERO_FLOP_OPS = frozenset(
    {
        "Constant",
        "ConstantOfShape",
        "Shape",
        "Size",
        "Identity",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "Concat",
        "Split",
        "Slice",
        "Gather",
        "GatherElements",
        "GatherND",
        "Expand",
        "Tile",
        "Cast",
        "Dropout",
        "Pad",
        "DepthToSpace",
        "SpaceToDepth",
    }
)


def param_counts(model: onnx.ModelProto, segments: Sequence[Segment]) -> tuple[int, int]:
    """Parameters (weight elements) read by the NPU segments, and by all: initializers, and
    tensors held in Constant nodes (some exporters keep every weight there) or in subgraphs."""
    sizes = _weights(model.graph)
    names = node_names(model.graph)
    index = dict(zip(names, model.graph.node))
    inner = {n: sum(_weights(g).values()) for n, node in index.items() for g in _subgraphs(node)}
    npu: set[str] = set()
    used: set[str] = set()
    for s in segments:
        for n in s.nodes:
            for r in [*node_reads(index[n]), *([f"<inside {n}>"] if inner.get(n) else [])]:
                if r in sizes or r.startswith("<inside "):
                    used.add(r)
                    if s.device == NPU:
                        npu.add(r)
    sizes.update({f"<inside {n}>": v for n, v in inner.items()})
    return sum(sizes[n] for n in npu), sum(sizes[n] for n in used)


def _weights(graph: onnx.GraphProto) -> dict[str, int]:
    sizes = {t.name: math.prod(int(d) for d in t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            sizes[node.output[0]] = math.prod(int(d) for d in node.attribute[0].t.dims)
        for g in _subgraphs(node):
            sizes.update({f"{node.name}/{k}": v for k, v in _weights(g).items()})
    return sizes


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def estimate_flops(
    model: onnx.ModelProto,
    types: Mapping[str, TensorType],
    placements: Sequence[NodePlacement] | None = None,
) -> dict[str, float | None]:
    """Estimated floating-point operations per node (a multiply-add counts 2).

    MatMul: 2 * |Y| * K. Gemm: 2 * M * N * K. Conv: 2 * |Y| * (C_in / group) * prod(kernel).
    ConvTranspose: 2 * |X| * (C_out / group) * prod(kernel). Einsum: 2 * the product of every
    index's size. com.microsoft Attention: the QKV projection plus 4 * B * S * S_kv * hidden;
    MultiHeadAttention / ai.onnx Attention: 4 * B * S_q * S_kv * hidden. LSTM/GRU/RNN:
    2 * seq * batch * directions * gates * hidden * (input + hidden). Data movement (Reshape,
    Transpose, Gather, ...) counts 0 and everything else 1 per output element (reductions: per
    input element). Constant-only nodes count 0. None where a needed shape is unknown.
    """
    constant = constant_nodes(placements) if placements is not None else set()
    out: dict[str, float | None] = {}
    for name, node in zip(node_names(model.graph), model.graph.node):
        out[name] = 0.0 if name in constant else _node_flops(node, types)
    return out


def _node_flops(node: onnx.NodeProto, types: Mapping[str, TensorType]) -> float | None:
    def shape(i: int, outputs: bool = False) -> tuple[int, ...] | None:
        names = node.output if outputs else node.input
        if i >= len(names) or not names[i]:
            return None
        t = types.get(names[i])
        return t.static_shape if t is not None else None

    op = node.op_type
    if op in _ZERO_FLOP_OPS:
        return 0.0
    if op in ("If", "Loop", "Scan"):
        return _control_flops(node, types)
    y = shape(0, outputs=True)
    if op in ("MatMul", "MatMulInteger", "FusedMatMul"):
        a = shape(0)
        if y is None or a is None or not a:
            return None
        return 2.0 * math.prod(y) * a[-1]
    if op == "Gemm":
        a = shape(0)
        if y is None or a is None or len(a) != 2:
            return None
        inner = a[0] if int_attr(node, "transA", 0) else a[1]
        return 2.0 * math.prod(y) * inner + (math.prod(y) if len(node.input) > 2 else 0)
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shape(3 if op == "QLinearConv" else 1)
        if y is None or w is None:
            return None
        return 2.0 * math.prod(y) * math.prod(w[1:])
    if op == "ConvTranspose":
        x, w = shape(0), shape(1)
        if x is None or w is None:
            return None
        return 2.0 * math.prod(x) * math.prod(w[1:])
    if op == "Einsum":
        return _einsum_flops(node, [shape(i) for i in range(len(node.input))])
    if op == "Attention" and node.domain == "com.microsoft":
        x, w = shape(0), shape(1)
        if x is None or w is None or len(x) != 3:
            return None
        b, s, _ = x
        hidden = w[1] // 3
        return 2.0 * b * s * w[0] * w[1] + 4.0 * b * s * s * hidden
    if op in ("MultiHeadAttention", "Attention", "GroupQueryAttention"):
        q, kv = shape(0), shape(1)
        if q is None or kv is None or len(q) < 3 or len(kv) < 3:
            return None
        if len(q) == 4:  # [B, heads, S, head_size]
            return 4.0 * q[0] * q[1] * q[2] * kv[2] * q[3]
        return 4.0 * q[0] * q[1] * kv[1] * q[2]
    if op in ("LSTM", "GRU", "RNN"):
        x = shape(0)
        hidden = int_attr(node, "hidden_size", 0)
        if x is None or len(x) != 3 or not hidden:
            return None
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
        dirs = 2 if str_attr(node, "direction", "forward") == "bidirectional" else 1
        return 2.0 * x[0] * x[1] * dirs * gates * hidden * (x[2] + hidden)
    if op.startswith("Reduce") or op in ("ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool"):
        x = shape(0)
        return float(math.prod(x)) if x is not None else None
    if y is None:  # a data-dependent output: count what it reads
        y = shape(0)
    return float(math.prod(y)) if y is not None else None


def _einsum_flops(node: onnx.NodeProto, shapes: Sequence[tuple[int, ...] | None]) -> float | None:
    equation = str_attr(node, "equation", "")
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs, shapes):
        if shape is None or "." in term or len(term) != len(shape):
            return None
        sizes.update(zip(term, shape))
    return 2.0 * math.prod(sizes.values())


def si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} "


def _control_flops(node: onnx.NodeProto, types: Mapping[str, TensorType]) -> float | None:
    """An If costs its dearer branch; a Loop or Scan one pass of its body (the trip count is
    rarely known here); None when no node inside has a known cost."""
    passes = []
    for g in _subgraphs(node):
        counted = [_node_flops(n, types) for n in g.node]
        known = [f for f in counted if f is not None]
        passes.append(sum(known) if known else None)
    known_passes = [p for p in passes if p is not None]
    return max(known_passes) if known_passes else None
