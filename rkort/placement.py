"""Where each node of a model runs, and why: the NPU (inside an RKNN blob) or the CPU (onnxruntime).

:func:`place` applies the rules below to every node; :func:`plan_segments` cuts the graph into
segments (consecutive nodes of one device); :func:`plan` does both for one input signature, keeps
light NPU islands between CPU parts on the CPU, and estimates the share of FLOPs and of parameters
on the NPU.

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

import heapq
import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto

log = logging.getLogger("rkort")

NPU = "npu"
CPU = "cpu"
#: The highest default-domain opset rknn-toolkit2 2.5.0 loads ('Unsupport onnx opset 20, need <= 19!').
MAX_OPSET = 19
#: An NPU segment with fewer estimated FLOPs than this, in a model that has CPU segments anyway,
#: runs on the CPU: a round trip to the NPU (about 0.1-0.4 ms per call on boards and on the
#: simulator) costs more than computing it there, and it saves a compile.
LIGHT_SEGMENT_FLOPS = 1_000_000

_STANDARD_DOMAINS = ("", "ai.onnx")
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
# Never folded into constants: a different value each run.
_NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
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


@dataclass(frozen=True)
class NodePlacement:
    """Where one node runs: ``device`` is "npu" or "cpu"; ``reason`` says why, in words."""

    node_name: str
    op_type: str
    device: str
    reason: str


@dataclass(frozen=True)
class Segment:
    """Consecutive nodes of one device, run as one unit (a blob, or an onnxruntime session).

    ``inputs`` are the tensors it reads from graph inputs or earlier segments, ``outputs`` the
    tensors later segments or the caller need. Constant-only nodes it reads are listed in
    ``nodes`` too (copied into each segment that uses them).
    """

    index: int
    device: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class TensorType:
    """What shape inference knows about a value: ``kind`` is "tensor", "sequence", "map",
    "optional", "sparse_tensor" or "unknown"; ``shape`` dims are ints, symbolic names, or None
    (unknown); ``shape`` None means the rank is unknown too."""

    kind: str
    elem_type: int = 0
    shape: Optional[tuple[int | str | None, ...]] = None

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        if self.shape is None or not all(isinstance(d, int) for d in self.shape):
            return None
        return tuple(int(d) for d in self.shape)  # type: ignore[arg-type]

    @property
    def known_shape(self) -> bool:
        """Every dim known, as a number or as a symbolic name fixed by the input signature."""
        return self.shape is not None and all(d is not None for d in self.shape)


@dataclass(frozen=True)
class Plan:
    """A model's placement and segments for one input signature, with the FLOP/parameter estimate.

    ``flops`` holds each node's estimated FLOPs (None where a shape is unknown); constant-only
    nodes count 0 (the converter folds them). ``params`` counts initializer elements per segment
    device: an initializer used by any NPU segment counts on the NPU.
    """

    placements: tuple[NodePlacement, ...]
    segments: tuple[Segment, ...]
    flops: Mapping[str, float | None]
    params_npu: int
    params_total: int
    notes: tuple[str, ...] = ()

    @property
    def flops_total(self) -> float:
        return float(sum(f for f in self.flops.values() if f))

    @property
    def flops_npu(self) -> float:
        device = {p.node_name: p.device for p in self.placements}
        return float(sum(f for n, f in self.flops.items() if f and device.get(n) == NPU))

    @property
    def npu_flop_share(self) -> float | None:
        total = self.flops_total
        return self.flops_npu / total if total else None

    @property
    def npu_param_share(self) -> float | None:
        return self.params_npu / self.params_total if self.params_total else None


# ---------------------------------------------------------------------------------------------
# Graph helpers


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


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in _STANDARD_DOMAINS:
            return int(imp.version)
    return 0


def infer_types(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, TensorType]:
    """The type and shape of every value shape inference can tell, with graph inputs fixed to
    ``input_shapes`` (others keep their declared, possibly symbolic, dims). Weights are not
    copied: inference reads only small shape tensors."""
    m = skeleton(model)
    for vi in m.graph.input:
        given = (input_shapes or {}).get(vi.name)
        if given is not None and vi.type.HasField("tensor_type"):
            shape = vi.type.tensor_type.shape
            shape.Clear()
            for size in given:
                shape.dim.add().dim_value = int(size)
    for vi in m.graph.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    del m.graph.value_info[:]
    types = _inferred(m, model)
    # Loop-carried values whose body keeps the shape (declared equal to the initial value's):
    # onnx leaves them unknown, so give them as hints and infer again.
    hints = []
    for node in m.graph.node:
        if node.op_type != "Loop" or node.domain not in _STANDARD_DOMAINS:
            continue
        body = next((a.g for a in node.attribute if a.name == "body"), None)
        if body is None:
            continue
        for k, out in enumerate(node.output[: max(0, len(node.input) - 2)]):
            init = types.get(node.input[k + 2])
            if not out or init is None or init.static_shape is None or k + 1 >= len(body.output):
                continue
            declared = _type_of(body.output[k + 1].type)
            found = types.get(out)
            if declared.static_shape == init.static_shape and (
                found is None or found.static_shape is None
            ):
                hints.append(
                    onnx.helper.make_tensor_value_info(out, init.elem_type, init.static_shape)
                )
    if hints:
        m.graph.value_info.extend(hints)
        types = _inferred(m, model)
    # Declared output shapes count where inference found none.
    for vi in model.graph.output:
        declared = _type_of(vi.type)
        found = types.get(vi.name)
        if found is None or (found.shape is None and declared.shape is not None):
            types[vi.name] = declared
    return types


def _inferred(skeleton: onnx.ModelProto, model: onnx.ModelProto) -> dict[str, TensorType]:
    try:
        m = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001 - inference is best effort; declared types remain
        log.debug("shape inference failed: %s", e)
        m = skeleton
    types: dict[str, TensorType] = {}
    for t in model.graph.initializer:
        types[t.name] = TensorType("tensor", t.data_type, tuple(int(d) for d in t.dims))
    for vi in list(m.graph.value_info) + list(m.graph.output):
        types[vi.name] = _type_of(vi.type)
    for vi in m.graph.input:
        types[vi.name] = _type_of(vi.type)
    return types


def _type_of(tp: onnx.TypeProto) -> TensorType:
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        tt = tp.tensor_type
        shape: tuple[int | str | None, ...] | None = None
        if tt.HasField("shape"):
            shape = tuple(
                int(d.dim_value)
                if d.HasField("dim_value")
                else (d.dim_param if d.HasField("dim_param") and d.dim_param else None)
                for d in tt.shape.dim
            )
        return TensorType("tensor", tt.elem_type, shape)
    if which in ("sequence_type", "map_type", "optional_type", "sparse_tensor_type"):
        return TensorType(which[: -len("_type")])
    return TensorType("unknown")


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the graph without weight bytes: initializers of more than 1024 elements keep
    their name, type and dims and point at absent external data. Cheap for large models; what
    shape inference and planning read is all there."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    src, g = model.graph, m.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    for t in src.initializer:
        if math.prod(t.dims) <= _SKELETON_KEEP and t.data_location != TensorProto.EXTERNAL:
            g.initializer.add().CopyFrom(t)
            continue
        stub = g.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "__rkort_absent__"
    return m


def lower_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """The model at opset 19 when onnx's version converter can take it there, else unchanged.

    Returns (model, note): the note says what happened (None when nothing was needed). The
    converter drops external-data references, so initializers are restored by name afterwards.
    """
    opset = default_opset(model)
    if opset <= MAX_OPSET:
        return model, None
    try:
        converted = onnx.version_converter.convert_version(model, MAX_OPSET)
    except Exception as e:  # noqa: BLE001 - any converter failure means: place per node
        reason = " ".join(str(e).split())
        if "Assertion" in reason:
            reason = reason.split("failed:", 1)[-1].strip()
        return model, (
            f"opset {opset}: onnx's version converter could not lower the model to opset "
            f"{MAX_OPSET} ({reason}); nodes whose op changed after opset {MAX_OPSET} run on the CPU"
        )
    originals = {t.name: t for t in model.graph.initializer}
    for t in converted.graph.initializer:
        src = originals.get(t.name)
        if src is not None and src.data_location == TensorProto.EXTERNAL:
            t.CopyFrom(src)
    return converted, f"opset {opset}: lowered to opset {MAX_OPSET} with onnx's version converter"


def freeze_shapes(
    model: onnx.ModelProto, types: Mapping[str, TensorType]
) -> onnx.ModelProto | None:
    """A copy in which Shape and Size of tensors with a static shape are Constant nodes (same
    node name, same output), or None when there is none. Under one static input signature these
    values are fixed, and as constants they can be copied into every segment that reads them."""
    names = node_names(model.graph)
    edits: dict[int, onnx.NodeProto] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in ("Shape", "Size") or node.domain not in _STANDARD_DOMAINS:
            continue
        t = types.get(node.input[0]) if node.input else None
        shape = t.static_shape if t is not None else None
        if shape is None or not node.output or not node.output[0]:
            continue
        if node.op_type == "Shape":
            start = _int_attr(node, "start", 0)
            end = next((int(a.i) for a in node.attribute if a.name == "end"), None)
            value = np.array(shape[start:end], dtype=np.int64)
        else:
            value = np.array(math.prod(shape), dtype=np.int64)
        edits[i] = _constant_node(names[i], node.output[0], value)
    return _replaced(model, edits)


#: Constant values up to this many elements are computed ahead (see :func:`fold_constants`).
FOLD_LIMIT = 4096
_FOLD_INPUT_LIMIT = 64
_SKELETON_KEEP = 1024


def fold_constants(model: onnx.ModelProto, limit: int = FOLD_LIMIT) -> onnx.ModelProto | None:
    """A copy in which small constant-only computations are Constant nodes (same node name,
    same output), or None when there is none to fold.

    Exporters compute shapes and masks from constants (ConstantOfShape, Where, Expand, ...);
    shape inference cannot see through them, but once folded it can. Only single-output nodes
    whose inputs and output hold at most ``limit`` elements are folded (weights never are).
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    names = node_names(graph)
    # Only small initializers take part: a node that copies or reshapes a weight stays a node
    # (folding it would duplicate the weight).
    values: dict[str, np.ndarray] = {}
    for t in graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and math.prod(t.dims) <= _FOLD_INPUT_LIMIT:
            values[t.name] = onnx.numpy_helper.to_array(t)
    edits: dict[int, onnx.NodeProto] = {}
    for i, node in enumerate(graph.node):
        reads = [r for r in node.input if r]
        if (
            node.domain not in _STANDARD_DOMAINS
            or node.op_type in _NONDETERMINISTIC
            or subgraph_reads(node)
            or len(node.output) != 1
            or not node.output[0]
            or not all(r in values for r in reads)
        ):
            continue
        value: np.ndarray | None
        try:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                value = onnx.numpy_helper.to_array(node.attribute[0].t)
            else:
                value = _evaluate(ReferenceEvaluator, node, values, default_opset(model))
        except Exception:  # noqa: BLE001 - anything the reference cannot run stays a node
            continue
        if value is None or value.size > limit or value.dtype == object:
            continue
        values[node.output[0]] = value
        if node.op_type != "Constant":
            edits[i] = _constant_node(names[i], node.output[0], value)
    return _replaced(model, edits)


def _constant_node(name: str, output: str, value: np.ndarray) -> onnx.NodeProto:
    return onnx.helper.make_node(
        "Constant", [], [output], name=name, value=onnx.numpy_helper.from_array(value)
    )


def _replaced(
    model: onnx.ModelProto, edits: Mapping[int, onnx.NodeProto]
) -> onnx.ModelProto | None:
    """A copy of ``model`` with the nodes at the given indices replaced (None if there are none)."""
    if not edits:
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, replacement in edits.items():
        copy.graph.node[i].CopyFrom(replacement)
    return copy


def _evaluate(
    evaluator: type, node: onnx.NodeProto, values: Mapping[str, np.ndarray], opset: int
) -> np.ndarray | None:
    inputs = [r for r in node.input if r]
    graph = onnx.helper.make_graph(
        [node],
        "fold",
        [
            onnx.helper.make_tensor_value_info(
                r, onnx.helper.np_dtype_to_tensor_dtype(values[r].dtype), values[r].shape
            )
            for r in dict.fromkeys(inputs)
        ],
        [onnx.helper.make_empty_tensor_value_info(node.output[0])],
    )
    m = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", opset or MAX_OPSET)]
    )
    out = evaluator(m).run(None, {r: values[r] for r in dict.fromkeys(inputs)})
    return np.asarray(out[0]) if out else None


def prepare(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[onnx.ModelProto, dict[str, TensorType]]:
    """The graph as planned for one input signature, and its value types: a :func:`skeleton`
    (no weight bytes: take initializers from the original by name) in which Shape/Size of
    static tensors and small constant computations are Constant nodes (names kept), repeated
    until shape inference learns nothing new."""
    model = skeleton(model)
    types = infer_types(model, input_shapes)
    for _ in range(4):
        changed = False
        frozen = freeze_shapes(model, types)
        if frozen is not None:
            model, changed = frozen, True
        folded = fold_constants(model)
        if folded is not None:
            model, changed = folded, True
        if not changed:
            break
        types = infer_types(model, input_shapes)
    return model, types


# ---------------------------------------------------------------------------------------------
# Placement


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
        deterministic = node.op_type not in _NONDETERMINISTIC and not subgraph_reads(node)
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
    if node.domain not in _STANDARD_DOMAINS:
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


# ---------------------------------------------------------------------------------------------
# Segments


def plan_segments(model: onnx.ModelProto, placements: Sequence[NodePlacement]) -> list[Segment]:
    """Cut the graph into segments of consecutive same-device nodes.

    The order is topological and chosen greedily to make few segments: run every node of the
    current device that is ready before switching. Constant-only NPU nodes are not scheduled but
    copied into each segment that reads them; nodes no graph output depends on are left out.
    Segment inputs and outputs are exactly the values that cross a boundary, plus the graph's
    inputs and outputs.
    """
    graph = model.graph
    names = node_names(graph)
    by_name = {p.node_name: p for p in placements}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"no placement for nodes {missing[:5]}")
    device = [by_name[n].device for n in names]
    reads = [node_reads(n) for n in graph.node]
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for o in node.output:
            if o:
                producer[o] = i
    floating = _constant_nodes(graph, device, reads)
    live = _live_nodes(graph, reads, producer)
    scheduled = [i for i in range(len(graph.node)) if i not in floating and i in live]
    deps: dict[int, set[int]] = {
        i: {producer[r] for r in reads[i] if r in producer and producer[r] not in floating}
        for i in scheduled
    }
    best: list[list[int]] | None = None
    for start in (NPU, CPU):
        groups = _schedule(scheduled, deps, device, start)
        if best is None or len(groups) < len(best):
            best = groups
    groups = best or []
    if not groups and floating:
        # A graph of constants only: one segment holding them all.
        groups = [sorted(floating)]
        floating = set()
    return _describe_segments(graph, names, device, reads, producer, floating, groups)


def _live_nodes(
    graph: onnx.GraphProto, reads: list[list[str]], producer: Mapping[str, int]
) -> set[int]:
    """Nodes a graph output depends on (the rest computes nothing anyone reads)."""
    live: set[int] = set()
    stack = [producer[o.name] for o in graph.output if o.name in producer]
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        stack.extend(producer[r] for r in reads[i] if r in producer)
    return live


def _constant_nodes(graph: onnx.GraphProto, device: list[str], reads: list[list[str]]) -> set[int]:
    """NPU nodes computing only from initializers and other such nodes (never a graph output)."""
    static = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    outputs = {o.name for o in graph.output}
    found: set[int] = set()
    for i, node in enumerate(graph.node):
        if (
            device[i] == NPU
            and node.op_type not in _NONDETERMINISTIC
            and not subgraph_reads(node)
            and all(r in static for r in reads[i])
            and not outputs.intersection(node.output)
        ):
            found.add(i)
            static.update(o for o in node.output if o)
    return found


def _schedule(
    nodes: list[int], deps: Mapping[int, set[int]], device: list[str], start: str
) -> list[list[int]]:
    users: dict[int, list[int]] = {i: [] for i in nodes}
    pending = {i: len(deps[i]) for i in nodes}
    for i in nodes:
        for d in deps[i]:
            users[d].append(i)
    ready: dict[str, list[int]] = {NPU: [], CPU: []}
    for i in nodes:
        if not pending[i]:
            heapq.heappush(ready[device[i]], i)
    groups: list[list[int]] = []
    current: list[int] = []
    cur = start
    while ready[NPU] or ready[CPU]:
        if not ready[cur]:
            if current:
                groups.append(current)
                current = []
            cur = CPU if cur == NPU else NPU
        i = heapq.heappop(ready[cur])
        current.append(i)
        for u in users[i]:
            pending[u] -= 1
            if not pending[u]:
                heapq.heappush(ready[device[u]], u)
    if current:
        groups.append(current)
    return groups


def _describe_segments(
    graph: onnx.GraphProto,
    names: list[str],
    device: list[str],
    reads: list[list[str]],
    producer: Mapping[str, int],
    floating: set[int],
    groups: list[list[int]],
) -> list[Segment]:
    graph_inputs = [i.name for i in graph.input]
    graph_outputs = [o.name for o in graph.output]
    initializers = {t.name for t in graph.initializer} | {
        t.values.name for t in graph.sparse_initializer
    }
    members: list[list[int]] = []
    for group in groups:
        own = set(group)
        stack = [producer[r] for i in group for r in reads[i] if r in producer]
        while stack:
            j = stack.pop()
            if j in floating and j not in own:
                own.add(j)
                stack.extend(producer[r] for r in reads[j] if r in producer)
        members.append(sorted(own))
    # Who reads each value, by segment.
    readers: dict[str, set[int]] = {}
    for s, nodes in enumerate(members):
        for i in nodes:
            for r in reads[i]:
                readers.setdefault(r, set()).add(s)
    segments = []
    for s, nodes in enumerate(members):
        made = {o for i in nodes for o in graph.node[i].output if o}
        needed: list[str] = []
        for i in nodes:
            for r in reads[i]:
                if r not in made and r not in initializers and r not in needed:
                    needed.append(r)
        inputs = [n for n in graph_inputs if n in needed] + [
            n for n in needed if n not in graph_inputs
        ]
        produced = [o for i in nodes if i not in floating for o in graph.node[i].output if o]
        outs = [n for n in graph_outputs if n in produced]
        outs += [o for o in produced if o not in outs and any(t != s for t in readers.get(o, ()))]
        segments.append(
            Segment(
                index=s,
                device=device[groups[s][0]],
                nodes=tuple(names[i] for i in nodes),
                inputs=tuple(inputs),
                outputs=tuple(outs),
            )
        )
    return segments


# ---------------------------------------------------------------------------------------------
# The whole plan: placement, segments, light islands, FLOPs and parameters


def plan(
    model: onnx.ModelProto,
    target: str,
    force_cpu: Collection[str] = (),
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rejected: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> Plan:
    """Place, cut into segments, keep light NPU islands on the CPU, and estimate the shares.

    The model is first :func:`prepare`d (Shape/Size of static tensors and small constant
    computations become Constant nodes; extract segments from the prepared model). Without ``input_shapes`` the declared shapes are used (FLOPs of nodes with unknown dims are
    not estimated and such models keep every island on the NPU).
    """
    op_types = dict(zip(node_names(model.graph), (n.op_type for n in model.graph.node)))
    model, types = prepare(model, input_shapes)
    placements = [
        NodePlacement(p.node_name, op_types.get(p.node_name, p.op_type), p.device, p.reason)
        for p in place(
            model, target, force_cpu, input_shapes=input_shapes, rejected=rejected, types=types
        )
    ]
    flops = estimate_flops(model, types, placements)
    side = _cpu_side_nodes(model, placements, flops)
    if side:
        placements = [
            NodePlacement(p.node_name, p.op_type, CPU, side[p.node_name])
            if p.node_name in side
            else p
            for p in placements
        ]
    segments = plan_segments(model, placements)
    for _ in range(8):
        if not any(s.device == CPU for s in segments):
            break
        light = _light_islands(segments, placements, flops)
        if not light:
            break
        placements = [
            NodePlacement(p.node_name, p.op_type, CPU, light[p.node_name])
            if p.node_name in light
            else p
            for p in placements
        ]
        segments = plan_segments(model, placements)
    npu_params, total = _param_counts(model, segments)
    return Plan(
        placements=tuple(placements),
        segments=tuple(segments),
        flops=flops,
        params_npu=npu_params,
        params_total=total,
        notes=tuple(notes),
    )


def _cpu_side_nodes(
    model: onnx.ModelProto,
    placements: Sequence[NodePlacement],
    flops: Mapping[str, float | None],
) -> dict[str, str]:
    """Light NPU nodes that read only what the CPU side has (graph inputs, constants, CPU
    outputs) and feed only CPU nodes, next to the CPU: computing them there saves a transfer."""
    graph = model.graph
    names = node_names(graph)
    device = {p.node_name: p.device for p in placements}
    if CPU not in device.values():
        return {}
    constant = constant_nodes(placements)
    producer = {o: n for n, node in zip(names, graph.node) for o in node.output if o}
    reads = {n: node_reads(node) for n, node in zip(names, graph.node)}
    consumers: dict[str, set[str]] = {n: set() for n in names}
    producers: dict[str, set[str]] = {n: set() for n in names}
    for n in names:
        for r in reads[n]:
            if r in producer:
                consumers[producer[r]].add(n)
                producers[n].add(producer[r])
    chosen: set[str] = set()
    for n in names:
        work = flops.get(n)
        if device[n] != NPU or n in constant or work is None or work >= LIGHT_SEGMENT_FLOPS:
            continue
        if all(device[p] == CPU or p in constant or p in chosen for p in producers[n]):
            chosen.add(n)
    changed = True
    while changed:
        changed = False
        for n in list(chosen):
            if any(device[c] != CPU and c not in chosen for c in consumers[n]):
                chosen.discard(n)
                changed = True
    # Only next to the CPU: never start a CPU segment of its own.
    reached = {n for n in chosen if any(device[m] == CPU for m in consumers[n] | producers[n])}
    stack = list(reached)
    while stack:
        n = stack.pop()
        for m in consumers[n] | producers[n]:
            if m in chosen and m not in reached:
                reached.add(m)
                stack.append(m)
    # Each connected group moves only if the group as a whole is light: a chain of many light
    # nodes (a whole small encoder) is real NPU work.
    moved: set[str] = set()
    seen: set[str] = set()
    for start in reached:
        if start in seen:
            continue
        group, stack = {start}, [start]
        while stack:
            n = stack.pop()
            for m in consumers[n] | producers[n]:
                if m in reached and m not in group:
                    group.add(m)
                    stack.append(m)
        seen |= group
        if sum(flops.get(n) or 0.0 for n in group) < LIGHT_SEGMENT_FLOPS:
            moved |= group
    reason = "light work that only feeds CPU parts: computed there to spare a transfer"
    return {n: reason for n in moved}


def _light_islands(
    segments: Sequence[Segment],
    placements: Sequence[NodePlacement],
    flops: Mapping[str, float | None],
) -> dict[str, str]:
    constant = constant_nodes(placements)
    moved: dict[str, str] = {}
    for s in segments:
        if s.device != NPU:
            continue
        work = [flops.get(n) for n in s.nodes if n not in constant]
        if not work or any(w is None for w in work):
            continue
        total = float(sum(w or 0.0 for w in work))
        if total < LIGHT_SEGMENT_FLOPS:
            reason = (
                f"light NPU work (~{_si(total)}FLOPs in segment) between CPU parts: cheaper on "
                "the CPU than a round trip to the NPU"
            )
            moved.update((n, reason) for n in s.nodes if n not in constant)
    return moved


def _param_counts(model: onnx.ModelProto, segments: Sequence[Segment]) -> tuple[int, int]:
    sizes = {t.name: math.prod(int(d) for d in t.dims) for t in model.graph.initializer}
    index = dict(zip(node_names(model.graph), model.graph.node))
    npu: set[str] = set()
    used: set[str] = set()
    for s in segments:
        for n in s.nodes:
            for r in node_reads(index[n]):
                if r in sizes:
                    used.add(r)
                    if s.device == NPU:
                        npu.add(r)
    return sum(sizes[n] for n in npu), sum(sizes[n] for n in used)


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
        inner = a[0] if _int_attr(node, "transA", 0) else a[1]
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
        hidden = _int_attr(node, "hidden_size", 0)
        if x is None or len(x) != 3 or not hidden:
            return None
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
        dirs = 2 if _str_attr(node, "direction", "forward") == "bidirectional" else 1
        return 2.0 * x[0] * x[1] * dirs * gates * hidden * (x[2] + hidden)
    if op.startswith("Reduce") or op in ("ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool"):
        x = shape(0)
        return float(math.prod(x)) if x is not None else None
    if y is None:  # a data-dependent output: count what it reads
        y = shape(0)
    return float(math.prod(y)) if y is not None else None


def _einsum_flops(node: onnx.NodeProto, shapes: Sequence[tuple[int, ...] | None]) -> float | None:
    equation = _str_attr(node, "equation", "")
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs, shapes):
        if shape is None or "." in term or len(term) != len(shape):
            return None
        sizes.update(zip(term, shape))
    return 2.0 * math.prod(sizes.values())


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _str_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    for a in node.attribute:
        if a.name == name:
            return a.s.decode("utf-8", "replace")
    return default


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} "


__all__ = [
    "CONSTANT_REASON",
    "CPU",
    "LIGHT_SEGMENT_FLOPS",
    "MAX_OPSET",
    "NPU",
    "NodePlacement",
    "Plan",
    "Segment",
    "TensorType",
    "constant_nodes",
    "default_opset",
    "estimate_flops",
    "fold_constants",
    "freeze_shapes",
    "prepare",
    "skeleton",
    "infer_types",
    "lower_opset",
    "node_names",
    "node_reads",
    "place",
    "plan",
    "plan_segments",
]
