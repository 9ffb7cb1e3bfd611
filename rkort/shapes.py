"""Static shapes for a compile: the input shapes chosen, and the output shapes they imply."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
from onnx import shape_inference


def infer_output_shapes(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]],
) -> dict[str, tuple[int, ...] | None]:
    """Each graph output's shape once the inputs have ``input_shapes`` (None where inference
    cannot tell a static shape)."""
    m = _copy_without_weights(model)
    for vi in m.graph.input:
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, size in zip(dims, input_shapes[vi.name]):
                d.Clear()
                d.dim_value = int(size)
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del m.graph.value_info[:]
    inferred = shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    out: dict[str, tuple[int, ...] | None] = {}
    for vi in inferred.graph.output:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
        else:
            out[vi.name] = None
    return out


def _copy_without_weights(src: onnx.ModelProto) -> onnx.ModelProto:
    """A copy keeping initializers' types and shapes but not large ones' bytes: inference needs
    only the small ones that feed shape computations."""
    dst = onnx.ModelProto()
    dst.CopyFrom(src)
    for t in dst.graph.initializer:
        if t.raw_data and len(t.raw_data) > 4096:
            # Keep dims and type; an external reference stands in for the bytes.
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            entry = t.external_data.add()
            entry.key, entry.value = "location", "__rkort_absent__"
    return dst
