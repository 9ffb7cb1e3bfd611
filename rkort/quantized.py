"""Models quantized for onnxruntime, lowered to the float graph the converter builds: weights
dequantized at rewrite time, activation quantization dropped.

The converter takes none of onnxruntime's quantized forms (uint8 tensors, com.microsoft ops).
Dynamic: DynamicQuantizeLinear + MatMulInteger/ConvInteger + Cast + Mul by the scales becomes a
float MatMul/Conv on ``(w - zero_point) * scale``, Gather of a quantized table + DequantizeLinear a
float Gather (only rounding is dropped: the activation is quantized from its own range each run).
QDQ: DequantizeLinear of a constant becomes a float initializer, a QuantizeLinear ->
DequantizeLinear pair on an activation a Clip to the range it holds (the quantizer folds Relu/Clip
into that range; the Clip keeps them and saturates as onnxruntime does). QOperator: QLinearConv,
QLinearMatMul, QGemm, QLinearAdd/Mul/Concat/Sigmoid/LeakyRelu/Softmax/Where/(Global)AveragePool
become their float op and that Clip. Each quantized activation gets a float "twin" that its readers
read and data movement (MaxPool, Reshape, ...) moves; nodes nothing reads any more go; what cannot
be lowered stays (on the CPU). A replacement node takes the name of the node it replaces.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import STANDARD_DOMAINS, _evaluate, default_opset, int_attr, node_names, node_reads

MS = "com.microsoft"

#: Float weights one rewrite adds at most (a protobuf holds 2 GiB in all).
FLOAT_LIMIT = 1 << 30

#: Part of what a lowered model is: bump when the rewrite changes what it writes.
FORMAT = 1

# QLinear op -> (float op, operands as input indices (value, scale, zero point, weight axis), the
# output's (scale, zero point), the int32 bias). Scale None passes the value through (Where's
# condition); axis None is Gemm's B (0 with transB, else the last).
_Operand = tuple[int, Optional[int], int, Optional[int]]
_X, _AB = ((0, 1, 2, 0),), ((0, 1, 2, 0), (3, 4, 5, 0))
_QLINEAR: dict[str, tuple[str, tuple[_Operand, ...], tuple[int, int], int | None]] = {
    "QLinearConv": ("Conv", _AB, (6, 7), 8),
    "QLinearMatMul": ("MatMul", ((0, 1, 2, 0), (3, 4, 5, -1)), (6, 7), None),
    "QGemm": ("Gemm", ((0, 1, 2, 0), (3, 4, 5, None)), (7, 8), 6),
    "QLinearAdd": ("Add", _AB, (6, 7), None),
    "QLinearMul": ("Mul", _AB, (6, 7), None),
    "QLinearSigmoid": ("Sigmoid", _X, (3, 4), None),
    "QLinearLeakyRelu": ("LeakyRelu", _X, (3, 4), None),
    "QLinearSoftmax": ("Softmax", _X, (3, 4), None),
    "QLinearAveragePool": ("AveragePool", _X, (3, 4), None),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", _X, (3, 4), None),
    "QLinearWhere": ("Where", ((0, None, 0, 0), (1, 2, 3, 0), (4, 5, 6, 0)), (7, 8), None),
}

#: The ops onnxruntime's quantizer writes (what makes a model "quantized" here).
QUANT_OPS = frozenset(
    "DynamicQuantizeLinear MatMulInteger ConvInteger QuantizeLinear DequantizeLinear "
    "QLinearConcat DynamicQuantizeMatMul MatMulIntegerToFloat".split()
) | frozenset(_QLINEAR)

# Ops that commute with a per-tensor dequantization (data movement, max): done on the twin.
_COMMUTING = frozenset(
    "Reshape Transpose Squeeze Unsqueeze Flatten Slice Gather Split Identity DepthToSpace "
    "SpaceToDepth Expand Tile Resize MaxPool GlobalMaxPool ReduceMax Concat".split()
)

# What a quantized type holds: the range a QuantizeLinear saturates to.
_BITS = {"UINT8": 8, "INT8": -8, "UINT16": 16, "INT16": -16, "UINT4": 4, "INT4": -4}
_RANGES = {
    int(getattr(TensorProto, t)): (-(2 ** (-b - 1)), 2 ** (-b - 1) - 1) if b < 0 else (0, 2**b - 1)
    for t, b in _BITS.items()
    if hasattr(TensorProto, t)
}

_Key = tuple[object, ...]
_Attrs = Sequence[onnx.AttributeProto]


class _Twin(NamedTuple):
    """The float value a quantized one stands for, and its scale's and zero point's keys."""

    value: str
    params: tuple[_Key, _Key]


def dequantize(
    model: onnx.ModelProto, *, base_dir: str | os.PathLike[str] | None = None
) -> tuple[onnx.ModelProto, str | None]:
    """The model with onnxruntime's quantization lowered to float ops, else unchanged.

    Returns (model, note) as :func:`rkort.graph.lower_opset` does: the note says what was lowered
    (None when the model holds no quantization). ``base_dir`` is where external weight files
    are; without it, ops whose quantized weights are external stay as they are.
    """
    if not any(_is_quant(n) for n in model.graph.node):
        return model, None
    rewrite = _Rewrite(model, base_dir)
    for i, node in enumerate(model.graph.node):
        rewrite.visit(i, node)
    return rewrite.result()


def _is_quant(node: onnx.NodeProto) -> bool:
    return node.op_type in QUANT_OPS and node.domain in (*STANDARD_DOMAINS, MS)


class _Rewrite:
    """One pass over the nodes in graph order; then what nothing reads any more is removed."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | os.PathLike[str] | None) -> None:
        self.model, graph = model, model.graph
        self.base_dir = os.fspath(base_dir) if base_dir is not None else None
        self.opset, self.names = default_opset(model), node_names(graph)
        self.inputs, self.outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
        self.inits = {t.name: t for t in graph.initializer if t.name not in self.inputs}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.inits[n.output[0]] = n.attribute[0].t
        self.producer: dict[str, int] = {}
        self.readers: dict[str, list[int]] = {}
        self.pinned = set(self.outputs)  # values whose name must stay (outputs, subgraph reads)
        for i, node in enumerate(graph.node):
            self.producer.update((o, i) for o in node.output if o)
            for r in node_reads(node):
                self.readers.setdefault(r, []).append(i)
            self.pinned.update(set(node_reads(node)) - set(node.input))  # by subgraphs
        self.taken = {*self.producer, *self.inputs, *self.outputs, *self.inits}
        self.consts: dict[str, np.ndarray] = {}
        self.twins: dict[str, _Twin] = {}
        self.alias: dict[str, str] = {}
        self.dropped: set[int] = set()
        self.nodes: list[tuple[onnx.NodeProto, str | None]] = []  # (node, name if new)
        self.new_inits: dict[str, onnx.TensorProto] = {}
        self.weights: dict[tuple[str, str, str, int], str] = {}
        self.float_bytes, self.clips = 0, 0
        self.lowered: Counter[str] = Counter()
        self.unread: set[str] = set()

    def visit(self, i: int, source: onnx.NodeProto) -> None:
        if i in self.dropped:
            return
        node = onnx.NodeProto()
        node.CopyFrom(source)
        node.input[:] = [self.alias.get(name, name) for name in source.input]
        if self._lower(i, node):
            self.nodes.append((node, None))

    def _lower(self, i: int, node: onnx.NodeProto) -> bool:
        """Emit the float form of node ``i``; returns whether the node itself stays."""
        op, standard = node.op_type, node.domain in STANDARD_DOMAINS
        if op == "DynamicQuantizeLinear" and standard:
            out = node.output
            self.twins[out[0]] = _Twin(node.input[0], (("v", out[1]), ("v", out[2])))
        elif op == "QuantizeLinear" and standard:
            self._quantize(node, self.names[i])
        elif op == "DequantizeLinear" and standard:
            return self._dequantize(i, node)
        elif op in ("MatMulInteger", "ConvInteger") and standard:
            self._integer(i, node)
        elif (op in _QLINEAR or op == "QLinearConcat") and (standard or node.domain == MS):
            return self._qlinear(i, node)
        elif op in _COMMUTING and standard:
            self._commute(i, node)
        return True

    def _quantize(self, node: onnx.NodeProto, name: str) -> None:
        """A twin for a QuantizeLinear's output: its input clipped to the range the output holds
        (a weight quantized in the graph is folded instead)."""
        x, scale, zp = _padded(node, 3)
        if all(v in self.inits or v in self.consts for v in node.input if v):
            from onnx.reference import ReferenceEvaluator

            feeds = {v: self._const(v) for v in node.input if v}
            known = {v: f for v, f in feeds.items() if f is not None}
            value = _evaluate(ReferenceEvaluator, node, known, max(self.opset, 19))
            if len(known) == len(feeds) and value is not None:
                self.consts[node.output[0]] = value
            return
        s = self._const(scale)
        elem = int(self.inits[zp].data_type) if zp in self.inits else None
        elem = int_attr(node, "output_dtype", TensorProto.UINT8) if not zp else elem
        twin, z = x, self._const(zp) if zp else np.zeros(())
        if (s is not None and s.size != 1) or elem not in _RANGES or self.opset < 11:
            return  # per-channel activations, float8, Clip without inputs: left to the CPU
        if s is not None and z is not None:
            (lo, hi), zf, sf = _RANGES[elem], float(z.reshape(-1)[0]), float(s.reshape(-1)[0])
            twin, bounds = self._fresh(_base(node.output[0])), []
            for side, b in (("min", lo), ("max", hi)):
                bounds.append(self._fresh(f"{twin}_{side}"))
                self._add_init(bounds[-1], np.array((b - zf) * sf, s.dtype))
            self._emit("Clip", [x, *bounds], [twin], name)
            self.clips += 1
        self.twins[node.output[0]] = _Twin(twin, (self._key(scale), self._key(zp)))

    def _dequantize(self, i: int, node: onnx.NodeProto) -> bool:
        q, scale, zp = _padded(node, 3)
        out, twin = node.output[0], self.twins.get(q)
        if twin is not None and twin.params == (self._key(scale), self._key(zp)):
            if out in self.pinned:
                self._emit("Identity", [twin.value], [out], self.names[i])
            self.alias.update({} if out in self.pinned else {out: twin.value})
            self.lowered["QuantizeLinear/DequantizeLinear"] += 1
            return False
        if out in self.pinned or int_attr(node, "block_size", 0):
            return True
        if all(v in self.inits or v in self.consts for v in node.input if v):
            value = self._dequantized(q, scale, zp, int_attr(node, "axis", 1))
            if value is None or not self._add_init(out, value):
                return True
            self.consts[out] = value
            self.lowered["DequantizeLinear (weights)"] += 1
            return False
        return not self._gather(q, scale, zp, out)

    def _gather(self, q: str, scale: str, zp: str, out: str) -> bool:
        """A quantized embedding (Gather of a quantized table) -> a Gather of the float table."""
        g = self.producer.get(q, -1)
        gather = self.model.graph.node[g] if g >= 0 else None
        if gather is None or gather.op_type != "Gather" or gather.input[0] not in self.inits:
            return False
        s = self._const(scale)
        table = self._weight(gather.input[0], scale, zp, 0) if s is not None and s.size == 1 else ""
        if table:
            self._emit("Gather", [table, gather.input[1]], [out], self.names[g], gather.attribute)
            self.lowered["Gather + DequantizeLinear"] += 1
        return bool(table)

    def _integer(self, i: int, node: onnx.NodeProto) -> None:
        """MatMulInteger/ConvInteger(twin, weight) -> Cast(float) -> Mul(product of scales): one
        float op that writes the Mul's output (the Cast and the Muls are then unread and go)."""
        cast = self._only_reader(node.output[0], "Cast")
        if cast is None or int_attr(cast[1], "to", 0) != TensorProto.FLOAT:
            return
        mul, cast_out = self._only_reader(cast[1].output[0], "Mul"), cast[1].output[0]
        x, w_name, x_zp, w_zp = _padded(node, 4)
        twin, w = self.twins.get(x), self._const(w_name)
        z = self._const(w_zp) if w_zp else np.zeros(())
        if mul is None or twin is None or w is None or z is None:
            return
        j, m = mul
        factors = self._factors(m.input[1] if m.input[0] == cast_out else m.input[0])
        scale, c = twin.params[0], np.ones((), np.float64)
        if twin.params[1] != self._key(x_zp) or len(scale) != 2:
            return
        if scale[0] == "v" and scale[1] in factors:
            factors.remove(str(scale[1]))
        elif scale[0] == "c":
            c = c / float(scale[1])  # type: ignore[arg-type]
        for f in factors:
            value = self._const(f)
            if value is None:
                return
            c = c * value.astype(np.float64)
        conv = node.op_type == "ConvInteger"
        per = _channel_scale(c, w.shape[0] if conv else w.shape[-1], conv)
        if per is None:
            return
        if conv:  # per output channel: axis 0 of the weight
            ones = [1] * (w.ndim - 1)
            z, per = z.reshape(-1, *ones) if z.size > 1 else z, per.reshape(-1, *ones)
        name = self._fresh(_base(w_name))
        weight = (w.astype(np.float32) - z.astype(np.float32)) * per.astype(np.float32)
        if not self._add_init(name, weight):
            return
        op = node.op_type[: -len("Integer")]
        self._emit(op, [twin.value, name], [m.output[0]], self.names[i], node.attribute)
        self.dropped.add(j)
        self.lowered[node.op_type] += 1

    def _qlinear(self, i: int, node: onnx.NodeProto) -> bool:
        """A QLinear op -> its float op on the float operands and the Clip of its output range."""
        op, ins = node.op_type, list(node.input)
        if op == "QLinearConcat":
            float_op, out_params, bias = "Concat", (0, 1), None
            operands: Sequence[_Operand] = [(k, k + 1, k + 2, 0) for k in range(2, len(ins), 3)]
        else:
            ins, (float_op, operands, out_params, bias) = _padded(node, 9), _QLINEAR[op]
        attrs = [a for a in node.attribute if a.name not in ("channels_last", "opset")]
        scaled = any(a.name in ("alpha", "beta") and a.f != 1.0 for a in node.attribute)
        softmax_axis = op == "QLinearSoftmax" and int_attr(node, "axis", -1) != -1  # < opset 13
        if int_attr(node, "channels_last", 0) or (scaled and op == "QGemm") or softmax_axis:
            return True
        inputs: list[str] = []
        for v, s, zp, axis in operands:
            axis = (0 if int_attr(node, "transB", 0) else -1) if axis is None else axis
            value = ins[v] if s is None else self._operand(ins[v], ins[s], ins[zp], axis)
            if value is None or not ins[v]:
                return True
            inputs.append(value)
        if bias is not None and ins[bias]:
            b, xs, ws = self._const(ins[bias]), self._const(ins[1]), self._const(ins[4])
            name = self._fresh(_base(ins[bias]))
            if b is None or xs is None or ws is None:
                return True
            if not self._add_init(name, (b.astype(np.float64) * xs * ws).astype(np.float32)):
                return True
            inputs.append(name)
        y, (ys, yzp) = node.output[0], (ins[k] for k in out_params)
        if not ys:  # a float output (QGemm)
            self._emit(float_op, inputs, [y], self.names[i], attrs)
            self.lowered[op] += 1
            return False
        out = self._fresh(_base(y) + "_float")
        self._emit(float_op, inputs, [out], self.names[i], attrs)
        quantize = helper.make_node("QuantizeLinear", [out, ys, yzp], [y])
        self._quantize(quantize, f"{self.names[i]}_clip")
        self.lowered[op] += y in self.twins
        return True  # read by what was not lowered, if anything

    def _commute(self, i: int, node: onnx.NodeProto) -> None:
        data = list(node.input) if node.op_type == "Concat" else [node.input[0]]
        twins = [self.twins.get(v) for v in data]
        indices = node.output[1] if node.op_type == "MaxPool" and len(node.output) > 1 else ""
        if not all(twins) or len({t.params for t in twins if t}) != 1:
            return
        if indices in self.readers or indices in self.pinned:
            return
        outs = [self._fresh(_base(o)) if o else "" for o in node.output]
        inputs = [t.value for t in twins if t] + list(node.input[len(data) :])
        self._emit(node.op_type, inputs, outs, self.names[i], node.attribute)
        for o, f in zip(node.output, outs):
            if o:
                self.twins[o] = _Twin(f, twins[0].params)  # type: ignore[union-attr]

    # -- values --

    def _operand(self, v: str, scale: str, zp: str, axis: int) -> str | None:
        """The float value of a quantized operand: a dequantized weight, the twin of an
        activation, else a DequantizeLinear of it (on the CPU)."""
        if v in self.inits or v in self.consts:
            return self._weight(v, scale, zp, axis)
        twin = self.twins.get(v)
        if twin is not None and twin.params == (self._key(scale), self._key(zp)):
            return twin.value
        out = self._fresh(_base(v) + "_dequantized")
        if not self._gather(v, scale, zp, out):
            self._emit("DequantizeLinear", [v, scale, zp], [out], out)
        return out

    def _weight(self, v: str, scale: str, zp: str, axis: int) -> str | None:
        key = (v, scale, zp, axis)
        if key not in self.weights:
            value, name = self._dequantized(v, scale, zp, axis), self._fresh(_base(v))
            if value is None or not self._add_init(name, value):
                return None
            self.weights[key] = name
        return self.weights[key]

    def _dequantized(self, q: str, scale: str, zp: str, axis: int) -> np.ndarray | None:
        """A constant dequantized as onnxruntime does it: float(q - zero_point) * scale."""
        w, s = self._const(q), self._const(scale)
        z = self._const(zp) if zp else np.zeros((), np.int64)
        if w is None or s is None or z is None or (s.size > 1 and s.ndim != 1):
            return None  # blocked quantization (opset 21) stays a node
        if s.size > 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            s, z = s.reshape(shape), z.reshape(shape) if z.size > 1 else z
        diff = w.astype(np.int64) - z.astype(np.int64) if w.dtype.kind in "iu" else w - z
        return (diff.astype(np.float32) * s.astype(np.float32)).astype(s.dtype)

    def _factors(self, value: str) -> list[str]:
        """``value`` as a product of values (through Mul nodes)."""
        i = self.producer.get(value)
        node = self.model.graph.node[i] if i is not None else None
        if node is None or node.op_type != "Mul" or node.domain not in STANDARD_DOMAINS:
            return [value]
        return self._factors(node.input[0]) + self._factors(node.input[1])

    def _only_reader(self, value: str, op: str) -> tuple[int, onnx.NodeProto] | None:
        readers = self.readers.get(value, [])
        if len(readers) != 1 or value in self.pinned:
            return None
        node = self.model.graph.node[readers[0]]
        ok = node.op_type == op and node.domain in STANDARD_DOMAINS
        return (readers[0], node) if ok else None

    def _const(self, name: str) -> np.ndarray | None:
        if name in self.consts:
            return self.consts[name]
        t = self.inits.get(name)
        if t is None:
            return None
        if t.data_location == TensorProto.EXTERNAL and self.base_dir is None:
            self.unread.add("weights in external files, no model directory given")
            return None
        value = numpy_helper.to_array(t, self.base_dir or "")
        if value.size <= 4096:
            self.consts[name] = value
        return value

    def _key(self, name: str) -> _Key:
        """Equal for equal values: a constant's numbers (no zero point is 0), else its name."""
        value = self._const(name) if name in self.inits or name in self.consts else None
        if not name or value is None:
            return ("c", 0.0) if not name else ("v", name)
        flat = value.astype(np.float64).reshape(-1)
        return ("c", float(flat[0])) if flat.size == 1 else ("c", value.shape, *flat.tolist())

    # -- the new graph --

    def _fresh(self, base: str) -> str:
        return _unique(base, self.taken)

    def _add_init(self, name: str, value: np.ndarray) -> bool:
        if self.float_bytes + value.nbytes > FLOAT_LIMIT:
            self.unread.add(f"float weights beyond {FLOAT_LIMIT >> 20} MiB")
            return False
        self.float_bytes += value.nbytes
        self.taken.add(name)
        self.new_inits[name] = numpy_helper.from_array(value, name)
        return True

    def _emit(self, op: str, ins: list[str], outs: list[str], name: str, a: _Attrs = ()) -> None:
        node = helper.make_node(op, ins, outs)
        node.attribute.extend(a)
        self.nodes.append((node, name))

    def result(self) -> tuple[onnx.ModelProto, str | None]:
        if not self.lowered:
            why = "; ".join(sorted(self.unread)) or "no form rkort lowers"
            return self.model, f"onnxruntime quantization left as it is ({why}): it runs on the CPU"
        # What the rewrite left unread goes (nodes unread before it stay, as they were).
        before = {r for n in self.model.graph.node for r in node_reads(n)} | self.outputs
        nodes, count = self.nodes, -1
        while count != len(nodes):
            count = len(nodes)
            read = {r for n, _ in nodes for r in node_reads(n)} | self.outputs
            nodes = [
                (n, p)
                for n, p in nodes
                if any(o in read for o in n.output) or (p is None and not before & {*n.output})
            ]
        taken: set[str] = set()
        for n, p in nodes:  # original nodes keep the names rkort knew them by
            if p is None and n.output[0] in self.producer:
                n.name = self.names[self.producer[n.output[0]]]
            taken.add(n.name if p is None else "")
        for n, p in nodes:
            if p is not None:
                n.name = _unique(p, taken) if p not in taken else _unique(p + "_float", taken)
        source = self.model.graph
        keep = read | self.inputs
        inits = [t for t in source.initializer if t.name in keep or t.name not in before]
        inits += [t for name, t in self.new_inits.items() if name in read]
        known = {o for n, _ in nodes for o in n.output} | self.inputs | {t.name for t in inits}
        copy = onnx.ModelProto()
        copy.CopyFrom(self.model)
        graph = copy.graph
        for field, items in (
            (graph.node, [n for n, _ in nodes]),
            (graph.initializer, inits),
            (graph.value_info, [vi for vi in source.value_info if vi.name in known]),
        ):
            del field[:]
            field.extend(items)
        note = f"onnxruntime quantization lowered to float ops ({_counts(self.lowered)}): "
        note += "weights dequantized to float32, activation quantization dropped"
        note += f" (its saturation kept as {self.clips} Clip)" if self.clips else ""
        left = _counts(Counter(n.op_type for n, _ in nodes if _is_quant(n)))
        why = f" ({'; '.join(sorted(self.unread))})" if self.unread else ""
        return copy, note + (f"; left as they are, on the CPU{why}: {left}" if left else "")


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))


def _padded(node: onnx.NodeProto, count: int) -> list[str]:
    """The node's inputs, with "" for missing optional ones up to ``count``."""
    return [*node.input] + [""] * (count - len(node.input))


def _unique(base: str, taken: set[str]) -> str:
    """``base``, or ``base_<k>`` if taken; marked taken."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _base(name: str) -> str:
    """A value name without the quantizer's suffix ('w_quantized' -> 'w')."""
    for suffix in ("_quantized", "_QuantizeLinear_Output", "_DequantizeLinear_Output"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _channel_scale(c: np.ndarray, channels: int, conv: bool) -> np.ndarray | None:
    """The output scale as one number or one per output channel (Conv: axis 1, MatMul: last)."""
    axis = c.ndim - 3 if conv else c.ndim - 1
    if c.size == 1 or (axis >= 0 and c.shape[axis] == c.size == channels):
        return c.reshape(()) if c.size == 1 else c.reshape(-1)
    return None
