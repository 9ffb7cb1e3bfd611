"""What each NPU part of a plan is built from: its BuildSpec (static shapes and dtypes from the
graph as planned for the signature) and the cache key of its blob."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from .cache import make_key
from .model import ModelSource
from .quantized import FORMAT as QUANTIZED_FORMAT
from .segment_files import SEGMENT_FORMAT, SegmentFiles, np_dtype
from .segments import Segment
from .shapes import Signature, declared_types, probe_output_shapes, static_shape
from .spec import BuildFailed, BuildSpec


class NotStatic(Exception):
    """An NPU segment whose shapes cannot be known before the run (a planning failure)."""

    def __init__(self, segment: Segment, error: BuildFailed) -> None:
        super().__init__(str(error))
        self.segment, self.error = segment, error


def whole_spec(
    source: ModelSource,
    sig: Signature,
    files: SegmentFiles,
    path: Path,
    build_config: Mapping[str, Any],
) -> BuildSpec:
    """The spec of the whole model as one blob: the graph's own inputs and outputs (output
    shapes from inference, else from one onnxruntime run on zeros)."""
    proto = source.proto
    declared = declared_types(proto)
    names = tuple(sig)
    outputs = tuple(o.name for o in proto.graph.output)
    output_shapes = [static_shape(files.types, n) for n in outputs]
    if any(s is None for s in output_shapes):
        feed = {n: (sig[n], np_dtype(declared[n])) for n in names}
        probed = probe_output_shapes(source.onnxruntime_source(), feed)
        output_shapes = [s or p for s, p in zip(output_shapes, probed)]
    return BuildSpec(
        model_path=str(path),
        input_names=names,
        input_shapes=tuple(sig[n] for n in names),
        input_dtypes=tuple(np_dtype(declared[n]).name for n in names),
        output_names=outputs,
        output_shapes=tuple(s for s in output_shapes if s is not None),
        output_dtypes=tuple(np_dtype(declared[n]).name for n in outputs),
        **build_config,
    )


def segment_spec(seg: Segment, files: SegmentFiles, build_config: Mapping[str, Any]) -> BuildSpec:
    """The spec of one segment file; :class:`NotStatic` when a shape or type it needs is unknown."""

    def static(name: str) -> tuple[int, ...]:
        shape = static_shape(files.types, name)
        if shape is None:
            raise NotStatic(
                seg,
                BuildFailed(
                    f"the shape of '{name}' cannot be inferred statically for the input "
                    f"shapes {files.signature}",
                    stage="planning",
                ),
            )
        return shape

    def dtype(name: str) -> str:
        t = files.types.get(name)
        if t is None or t.kind != "tensor" or not t.elem_type:
            raise NotStatic(
                seg, BuildFailed(f"the type of '{name}' cannot be inferred", stage="planning")
            )
        return np_dtype(t).name

    return BuildSpec(
        model_path=str(files.path(seg)),
        input_names=seg.inputs,
        input_shapes=tuple(static(n) for n in seg.inputs),
        input_dtypes=tuple(dtype(n) for n in seg.inputs),
        output_names=seg.outputs,
        output_shapes=tuple(static(n) for n in seg.outputs),
        output_dtypes=tuple(dtype(n) for n in seg.outputs),
        **build_config,
    )


def blob_key(model_hash: str, spec: BuildSpec, source: str, nodes: Sequence[str]) -> str:
    """The cache key of a blob: the model's content, the spec, and for anything but the model
    file itself what cut it (rkort's segment format, onnx's version, the nodes)."""
    parts: dict[str, Any] = {"model": model_hash, **spec.key_parts()}
    if source != "model":
        parts["segment"] = {
            "source": source,
            "format": SEGMENT_FORMAT,
            "dequantize": QUANTIZED_FORMAT,
            "onnx": onnx.__version__,
            "nodes": hashlib.sha256("\n".join(nodes).encode()).hexdigest(),
        }
    return make_key(parts)
