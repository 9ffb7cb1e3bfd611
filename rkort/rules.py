"""Where each node runs, and why: the per-target rules that put a node on the NPU (inside an RKNN
blob) or on the CPU (onnxruntime).

A node goes to the CPU when (first match wins; every rule was checked with rknn-toolkit2 2.5.0
trial builds of one-op models unless its comment names another source):

1. the user forced it (an op type or a node name in ``force_cpu``), or a trial build rejected it;
2. its op is outside the standard ONNX domain (com.microsoft, ai.onnx.ml, custom domains);
3. it reads or writes a string, sequence, map or optional value, or a tensor type the converter
   cannot take or would compute in float16 (float64);
4. the model's opset is above 19 and the op changed after opset 19 (onnx's version converter
   could not take the model down to 19, so this node has no opset-19 form);
5. the converter refuses it: data-dependent output shapes (NonZero, Unique, NonMaxSuppression),
   Loop, Scan, If, an input the converter needs constant but that is computed at run time (Range,
   Reshape, Expand, TopK, Compress, ...), or an input whose shape depends on such values;
6. it is known to be wrong on the NPU (ReverseSequence ignores sequence_lens);
7. the target's board runtime has no kernel for it (see ``_RUNTIME_LACKS`` and
   ``_MINI_RUNTIME_NPU_OPS``).

Everything else stays in the blob, including ops the converter gives to the RKNN runtime's own CPU
kernels on the board (TopK, GatherND, Erf, ...): they are not worth a segment boundary. Nodes that
only compute constants (from initializers and Constant nodes) are copied into every segment that
reads them, so a constant never crosses a boundary (the converter needs shape inputs constant).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from .graph import (
    MAX_OPSET,
    NONDETERMINISTIC,
    STANDARD_DOMAINS,
    TensorType,
    default_opset,
    infer_types,
    node_names,
    node_reads,
    subgraph_reads,
)

log = logging.getLogger("rkort")

NPU = "npu"


CPU = "cpu"


#: The reason of nodes that compute constants (copied into the segments that read them).
CONSTANT_REASON = "constant: known before the run (copied into each segment that reads it)"


# Rule 5. Trial builds: "The input 0 of NonZero('y') need to be constant! It will cause the graph
# to be a dynamic graph!" (same for Unique, NonMaxSuppression).
_DATA_DEPENDENT = frozenset({"NonZero", "Unique", "NonMaxSuppression"})


_CONTROL_FLOW = {
    # Trial build: "The Loop('y') will cause the graph to be a dynamic graph!".
    "Loop": "Loop: the converter refuses it (a dynamic graph)",
    # Trial build: accepted only as an unknown CPU layer ('Meet unsupported onnx attribute kind: 8',
    # its body graph is dropped).
    "Scan": "Scan: the converter cannot express its body graph",
    # Trial builds: a runtime condition is refused ('will cause the graph to be a dynamic graph'),
    # a constant one is mis-folded ('All outputs [...] of model are constants').
    "If": "If: the converter refuses a runtime condition and mis-folds a constant one",
}


# Inputs the converter needs constant (given static input shapes). Trial builds: Range (input 1),
# Reshape 1, Expand 1, TopK 1, Compress 1 ("The input 1 of Reshape('y') need to be constant!");
# the rest share the same shape-input role and are listed by analogy.
_NEEDS_CONSTANT: dict[str, tuple[int, ...]] = {
    "Range": (0, 1, 2),
    "Reshape": (1,),
    "Expand": (1,),
    "TopK": (1,),
    "Compress": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Slice": (1, 2, 3, 4),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Pad": (1, 2, 3),
    "OneHot": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "CumSum": (1,),
}


# Rule 6. Simulator run: rows with sequence_lens < the time dimension come back fully reversed.
_WRONG_ON_NPU = {"ReverseSequence": "ReverseSequence: wrong on the NPU (sequence_lens is ignored)"}


# Rule 3. Trial builds: uint8 ('Not Support Dtype: 2', even a uint8 graph input into a Cast),
# uint16 ('Not Support Dtype: 4'), uint64 ('Not Support Dtype: 13'), bfloat16 ('No corresponding
# Numpy type'); int8 and int16 build. float64 builds but is computed in float16, which a model
# asking for float64 does not expect.
_CPU_TENSOR_TYPES: dict[int, str] = {
    TensorProto.STRING: "string",
    TensorProto.UINT8: "uint8",
    TensorProto.UINT16: "uint16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.UINT64: "uint64",
    TensorProto.UINT32: "uint32",
    TensorProto.DOUBLE: "float64",
    TensorProto.COMPLEX64: "complex64",
    TensorProto.COMPLEX128: "complex128",
}
for _name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "INT4", "UINT4"):
    if hasattr(TensorProto, _name):
        _CPU_TENSOR_TYPES[getattr(TensorProto, _name)] = _name.lower()
_SEQUENCE_OPS = frozenset(
    {
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SequenceMap",
        "SplitToSequence",
        "ConcatFromSequence",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
        "StringConcat",
        "StringNormalizer",
        "StringSplit",
        "RegexFullMatch",
    }
)


# Rule 7, full runtimes (librknnrt: rk3588, rk3576, rk3568, rk3566, rk3562, rv1126b). The converter
# leaves these ops to the runtime's CPU kernels (trial builds on rk3588: GridSample, Mod, Floor and
# an int64 CumSum come out as CPU layers), and board runtimes were reported to lack those kernels:
_RUNTIME_LACKS = {
    # airockchip/rknn-toolkit2#478 ('Unsupport CPU op: GridSample in this librknnrt.so', 2.3.2)
    # and #276 (converts, fails on an RK3588 board).
    "GridSample": "GridSample",
    # immich-app/immich#17098 (RK3566, XLM-RoBERTa: 'Unsupport CPU op: CumSum in this
    # librknnrt.so') and airockchip/rknn-toolkit2#470.
    "CumSum": "CumSum",
    # airockchip/rknn-toolkit2#485 (simulator fine, the board refuses the Mod op, 2.3.2).
    "Mod": "Mod",
    # rockchip-linux/rknn-toolkit2#266 ('Meet unsupported operator: Floor').
    "Floor": "Floor",
}


_RUNTIME_SOURCES = {
    "GridSample": "airockchip/rknn-toolkit2#478",
    "CumSum": "immich-app/immich#17098",
    "Mod": "airockchip/rknn-toolkit2#485",
    "Floor": "rockchip-linux/rknn-toolkit2#266",
}


# Rule 7, mini runtimes (librknnmrt on rv1103/rv1106 and their b variants): they lack nearly every
# CPU kernel (airockchip/rknn-toolkit2#482 Min, #145 and #316 Transpose, #217 AveragePool, #359 and
# #561 exNorm/LayerNormalization, #557 ArgMax, #560 Resize; airockchip/rknn_model_zoo#312 Pow), so
# only ops the converter puts on the NPU stay. This list is what rv1106 w8a8 trial builds of one-op
# models put on the NPU (the layer table's Target column); Exp, Log, Sin, Cos, Floor, Ceil, Round,
# Erf, Min, Pow, ReduceMax, ReduceMin, Equal, Greater, Cast, Expand, ScatterND, SpaceToDepth, Selu,
# Mish, Reciprocal and LayerNormalization came out on the CPU. Shape inputs fold away under static
# shapes. The converter can still move an op to the CPU for its attributes or sizes (a large
# Transpose, AveragePool with count_include_pad=0); a board then refuses the blob.
_MINI_RUNTIME_NPU_OPS = frozenset(
    {
        "Abs",
        "Add",
        "AveragePool",
        "BatchNormalization",
        "Clip",
        "Concat",
        "Constant",
        "Conv",
        "ConvTranspose",
        "DepthToSpace",
        "Div",
        "Dropout",
        "Einsum",
        "Elu",
        "Flatten",
        "Gather",
        "Gemm",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "InstanceNormalization",
        "LeakyRelu",
        "MatMul",
        "Max",
        "MaxPool",
        "Mul",
        "Neg",
        "Pad",
        "PRelu",
        "ReduceMean",
        "ReduceSum",
        "Relu",
        "Reshape",
        "Resize",
        "Shape",
        "Sigmoid",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",
        "Tile",
        "Transpose",
        "Unsqueeze",
        "Where",
    }
)


# rk2118: no public reports; its runtime is of the same small-MCU kind, so it is treated as a mini
# runtime (an assumption, not a measurement).
_MINI_RUNTIME_TARGETS = frozenset({"rv1103", "rv1103b", "rv1106", "rv1106b", "rk2118"})


# Ops rk3588 trial builds left to the RKNN runtime's CPU kernels (the layer table's Target column),
# with the ones the toolchain facts list; said in the report, not a reason to leave the blob.
_RUNTIME_CPU_OPS = frozenset(
    {
        "ArgMax",
        "ArgMin",
        "Atan",
        "Cast",
        "Ceil",
        "Celu",
        "Cos",
        "DFT",
        "Det",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "GatherND",
        "Greater",
        "Hardmax",
        "IsNaN",
        "Less",
        "Log",
        "Min",
        "Mish",
        "Pow",
        "Reciprocal",
        "ReduceMax",
        "ReduceMin",
        "Round",
        "ScatterND",
        "Selu",
        "Sign",
        "Sin",
        "SpaceToDepth",
        "TopK",
        "Trilu",
    }
)


@dataclass(frozen=True)
class NodePlacement:
    """Where one node runs: ``device`` is "npu" or "cpu"; ``reason`` says why, in words."""

    node_name: str
    op_type: str
    device: str
    reason: str


def constant_nodes(placements: Iterable[NodePlacement]) -> set[str]:
    """The names of nodes placed as constants (they belong to no single segment)."""
    return {p.node_name for p in placements if p.reason == CONSTANT_REASON}


def place(
    model: onnx.ModelProto,
    target: str,
    force_cpu: Collection[str] = (),
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rejected: Mapping[str, str] | None = None,
    types: Mapping[str, TensorType] | None = None,
) -> list[NodePlacement]:
    """Each node's device and the reason, in graph order (names as :func:`node_names` gives).

    ``force_cpu`` holds op types and/or node names; ``rejected`` maps node names to the reason a
    trial build gave. With ``input_shapes`` (one static signature), values whose shape inference
    finds no static shape are treated as data-dependent. Call :func:`lower_opset` first for
    models above opset 19 (nodes that have no opset-19 form go to the CPU here).
    """
    target = target.lower()
    graph = model.graph
    names = node_names(graph)
    forced = set(force_cpu)
    unmatched = forced - set(names) - {n.op_type for n in graph.node}
    if unmatched:
        log.warning("force_cpu entries %s name no op type or node in the model", sorted(unmatched))
    rejected = dict(rejected or {})
    if types is None:
        types = infer_types(model, input_shapes)
    opset = default_opset(model)
    outputs = {o.name for o in graph.output}
    # Constants: initializers and what constant-only NPU nodes compute (copied, never cut).
    static = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    # Values fixed once the input shapes are: constants, and what NPU nodes compute from them and
    # from the shapes of tensors (Shape, Size); the converter folds these.
    fixed = set(static)
    # Values whose shape depends on data, with the node that made it so (for the reason).
    dynamic: dict[str, str] = {}
    placements: list[NodePlacement] = []
    for name, node in zip(names, graph.node):
        reads = node_reads(node)
        made = [o for o in node.output if o]
        deterministic = node.op_type not in NONDETERMINISTIC and not subgraph_reads(node)
        constant = (
            deterministic and all(r in static for r in reads) and not outputs.intersection(made)
        )
        reason = _cpu_reason(
            node, name, reads, target, forced, rejected, types, opset, fixed, dynamic, constant
        )
        if reason is None and deterministic and all(r in static for r in reads) and made:
            if outputs.intersection(made):
                # A blob cannot output a constant ('All outputs ... are constants').
                reason = "a constant model output: onnxruntime computes it"
        if reason is not None:
            _mark_dynamic(node, name, reads, types, fixed, dynamic, input_shapes is not None)
            placements.append(NodePlacement(name, node.op_type, CPU, reason))
            continue
        if constant:
            static.update(made)
            fixed.update(made)
            reason = CONSTANT_REASON
        else:
            if deterministic and (
                node.op_type in ("Shape", "Size") or all(r in fixed for r in reads)
            ):
                fixed.update(made)
            reason = _npu_reason(node.op_type)
        placements.append(NodePlacement(name, node.op_type, NPU, reason))
    return placements


def _cpu_reason(
    node: onnx.NodeProto,
    name: str,
    reads: list[str],
    target: str,
    forced: set[str],
    rejected: Mapping[str, str],
    types: Mapping[str, TensorType],
    opset: int,
    fixed: set[str],
    dynamic: Mapping[str, str],
    constant: bool,
) -> str | None:
    op = node.op_type
    if name in forced:
        return "forced to the CPU by the user (node name)"
    if op in forced:
        return f"forced to the CPU by the user (op type {op})"
    if name in rejected:
        return rejected[name]
    if node.domain not in STANDARD_DOMAINS:
        return (
            f"op {node.domain}::{op} is outside the standard ONNX domain: the converter keeps "
            "such ops off the NPU and board runtimes are not known to implement them"
        )
    for value in list(reads) + [o for o in node.output if o]:
        t = types.get(value)
        if t is None:
            continue
        if t.kind not in ("tensor", "unknown"):
            return f"'{value}' is a {t.kind}, which the converter cannot take"
        if t.elem_type in _CPU_TENSOR_TYPES:
            kind = _CPU_TENSOR_TYPES[t.elem_type]
            if kind == "float64":
                return f"'{value}' is float64, which the NPU would compute in float16"
            return f"'{value}' is a {kind} tensor, which the converter cannot take"
    if op in _SEQUENCE_OPS:
        return f"{op} works on sequences, strings or optionals, which the converter cannot take"
    if opset > MAX_OPSET:
        since = _since_version(op, opset)
        if since is None or since > MAX_OPSET:
            return (
                f"{op} at opset {opset} (defined in opset {since}) has no opset-{MAX_OPSET} form; "
                f"rknn-toolkit2 takes opset <= {MAX_OPSET}"
            )
    if op in _DATA_DEPENDENT:
        return f"{op}: its output shape depends on the data; the converter refuses it"
    if op in _CONTROL_FLOW:
        return _CONTROL_FLOW[op]
    for value in reads:
        if value in dynamic:
            return (
                f"the shape of its input '{value}' depends on values computed at run time "
                f"(after {dynamic[value]})"
            )
    for i in _NEEDS_CONSTANT.get(op, ()):
        if i < len(node.input) and node.input[i] and node.input[i] not in fixed:
            return (
                f"{op}: input {i} ('{node.input[i]}') is computed at run time; "
                "the converter needs it constant"
            )
    if op in _WRONG_ON_NPU:
        return _WRONG_ON_NPU[op]
    if constant:
        return None  # folded by the converter at build time: no runtime kernel needed
    if target in _MINI_RUNTIME_TARGETS:
        if op not in _MINI_RUNTIME_NPU_OPS:
            return (
                f"{op} would run on the {target} runtime's CPU kernels, which the small "
                "librknnmrt runtime lacks (only ops verified to compile onto the NPU stay)"
            )
    elif op in _RUNTIME_LACKS:
        return (
            f"{op}: the {target} board runtime (librknnrt) has no CPU kernel for it "
            f"(reported in {_RUNTIME_SOURCES[op]})"
        )
    return None


def _mark_dynamic(
    node: onnx.NodeProto,
    name: str,
    reads: list[str],
    types: Mapping[str, TensorType],
    fixed: set[str],
    dynamic: dict[str, str],
    signature_fixed: bool,
) -> None:
    """Record which outputs of a CPU node have data-dependent shapes."""
    origin = next((dynamic[r] for r in reads if r in dynamic), None)
    op = node.op_type
    seeds = op in _DATA_DEPENDENT or any(
        i < len(node.input) and node.input[i] and node.input[i] not in fixed
        for i in _NEEDS_CONSTANT.get(op, ())
    )
    control = op in _CONTROL_FLOW
    for out in node.output:
        if not out:
            continue
        t = types.get(out)
        known = t is not None and (t.static_shape is not None if signature_fixed else t.known_shape)
        if origin is not None or seeds or control:
            if known and op not in _DATA_DEPENDENT:
                continue
            dynamic[out] = origin or f"{op} '{name}'"
        elif signature_fixed and t is not None and t.kind == "tensor" and not known:
            dynamic[out] = f"{op} '{name}'"


def _npu_reason(op: str) -> str:
    if op in _RUNTIME_CPU_OPS:
        return (
            "in the blob; the converter may leave it to the RKNN runtime's own CPU kernels, "
            "which the board has"
        )
    return "supported by the converter"


def _since_version(op: str, opset: int) -> int | None:
    try:
        return int(onnx.defs.get_schema(op, opset, "").since_version)
    except Exception:  # noqa: BLE001 - an op onnx does not define
        return None
