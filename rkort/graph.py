"""Facts about an ONNX graph that every later room reads: node names, what each node reads, value
types and shapes (shape inference, with weights left out), and the graph as planned for one input
signature (Shape/Size of static tensors and small constant computations folded into constants,
settled control flow written out, the opset lowered to what the converter loads).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto

from .controlflow import inline_control_flow
from .nodes import STANDARD_DOMAINS, node_names, node_reads, subgraph_reads  # noqa: F401

log = logging.getLogger("rkort")

#: The highest default-domain opset rknn-toolkit2 2.5.0 loads ('Unsupport onnx opset 20, need <= 19!').
MAX_OPSET = 19


# Never folded into constants: a different value each run.
NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)


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


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS:
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
        if node.op_type != "Loop" or node.domain not in STANDARD_DOMAINS:
            continue
        body = next((a.g for a in node.attribute if a.name == "body"), None)
        if body is None:
            continue
        for k, out in enumerate(node.output[: max(0, len(node.input) - 2)]):
            init = types.get(node.input[k + 2])
            if not out or init is None or init.static_shape is None or k + 1 >= len(body.output):
                continue
            declared = type_of(body.output[k + 1].type)
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
        declared = type_of(vi.type)
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
        types[vi.name] = type_of(vi.type)
    for vi in m.graph.input:
        types[vi.name] = type_of(vi.type)
    return types


def type_of(tp: onnx.TypeProto) -> TensorType:
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        tt = tp.tensor_type
        shape: tuple[int | str | None, ...] | None = None
        if tt.HasField("shape"):
            # A negative size (paddle2onnx writes -1) and the name "?" mean "not known", as
            # onnxruntime reads them, not a size or a symbol shared by every such dim.
            shape = tuple(
                (int(d.dim_value) if d.dim_value >= 0 else None)
                if d.HasField("dim_value")
                else (
                    d.dim_param
                    if d.HasField("dim_param") and d.dim_param not in ("", "?")
                    else None
                )
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
        if node.op_type not in ("Shape", "Size") or node.domain not in STANDARD_DOMAINS:
            continue
        t = types.get(node.input[0]) if node.input else None
        shape = t.static_shape if t is not None else None
        if shape is None or not node.output or not node.output[0]:
            continue
        if node.op_type == "Shape":
            start = int_attr(node, "start", 0)
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
            node.domain not in STANDARD_DOMAINS
            or node.op_type in NONDETERMINISTIC
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
    # numpy's own warnings (log of 0, a cast of inf) are the model's arithmetic, as onnxruntime
    # computes it too; they are not the user's to read.
    with np.errstate(all="ignore"):
        out = evaluator(m).run(None, {r: values[r] for r in dict.fromkeys(inputs)})
    return np.asarray(out[0]) if out else None


def prepare(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[onnx.ModelProto, dict[str, TensorType]]:
    """The graph as planned for one input signature, and its value types: a :func:`skeleton`
    (no weight bytes: take initializers from the original by name) in which Shape/Size of
    static tensors and small constant computations are Constant nodes (names kept), and control
    flow the signature settles is written out (:mod:`rkort.controlflow`), repeated until shape
    inference learns nothing new."""
    model = skeleton(model)
    types = infer_types(model, input_shapes)
    for _ in range(8):
        changed = False
        frozen = freeze_shapes(model, types)
        if frozen is not None:
            model, changed = frozen, True
        folded = fold_constants(model)
        if folded is not None:
            model, changed = folded, True
        inlined = inline_control_flow(model, types)
        if inlined is not None:
            model, changed = inlined, True
        if not changed:
            break
        types = infer_types(model, input_shapes)
    return model, types


def int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def str_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    for a in node.attribute:
        if a.name == name:
            return a.s.decode("utf-8", "replace")
    return default
