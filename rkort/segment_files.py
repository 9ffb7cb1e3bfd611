"""The ONNX files segments run from: one small model per segment, cut from the graph as planned
for one input signature, with static shapes for the converter (NPU) or free dims (CPU).

External weights stay external (the segment's directory links to the original files); embedded
weights are copied into the segments that read them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import MAX_OPSET, TensorType, node_names, node_reads
from .rules import NPU
from .segments import Segment

#: Part of every segment file's name and blob key: bump when extraction changes what a segment
#: file holds, so blobs cached for a segment are not reused for a different graph.
SEGMENT_FORMAT = 2
_EMBEDDED_LIMIT = 1 << 30


def np_dtype(t: TensorType) -> np.dtype:
    """The numpy dtype of a tensor type (object for anything that is not a tensor)."""
    if t.kind != "tensor" or not t.elem_type:
        return np.dtype(object)
    return np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))


def segment_path(directory: Path, seg: Segment, signature: Mapping[str, tuple[int, ...]]) -> Path:
    """Where the file of ``seg`` for ``signature`` goes: its name is a digest of both."""
    shapes = sorted((n, tuple(s)) for n, s in signature.items())
    digest = hashlib.sha256(
        repr((SEGMENT_FORMAT, seg.device, seg.nodes, seg.inputs, seg.outputs, shapes)).encode()
    ).hexdigest()[:16]
    return Path(directory) / f"segment-{seg.device}-{digest}.onnx"


def lowered_path(directory: Path) -> Path:
    """Where the whole model lowered to the converter's opset goes."""
    return Path(directory) / f"model-opset{MAX_OPSET}.onnx"


class SegmentFiles:
    """Writes segment files for one model and signature into ``directory``.

    ``original`` is the model as given (after opset lowering), ``prepared`` and ``types`` the
    graph as planned for ``signature`` (:func:`rkort.graph.prepare`); ``source_dir`` is where the
    original's external data lives (None for a model given as bytes).
    """

    def __init__(
        self,
        original: onnx.ModelProto,
        prepared: onnx.ModelProto,
        types: Mapping[str, TensorType],
        signature: Mapping[str, tuple[int, ...]],
        source_dir: Path | None,
        directory: Path,
    ) -> None:
        self.original = original
        self.prepared = prepared
        self.types = types
        self.signature = dict(signature)
        self.source_dir = source_dir
        self.directory = Path(directory)
        self._index = dict(zip(node_names(prepared.graph), prepared.graph.node))
        self._linked: set[str] = set()
        self._written: set[Path] = set()

    def path(self, seg: Segment) -> Path:
        """Where the file of ``seg`` is (or will be) written."""
        return segment_path(self.directory, seg, self.signature)

    def lowered_path(self) -> Path:
        """Where the whole model lowered to the converter's opset is written."""
        return lowered_path(self.directory)

    def write_lowered(self) -> Path:
        """The whole (lowered) model as one file."""
        path = self.lowered_path()
        if not path.exists():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._link_external(self.original.graph.initializer)
            _save(self.original, path)
            self._written.add(path)
        return path

    def write(self, seg: Segment) -> Path:
        """The file of one segment (written once; later calls return the same path)."""
        path = self.path(seg)
        if path.exists():
            return path
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        graph = self.prepared.graph
        nodes = []
        reads: set[str] = set()
        domains: set[str] = set()
        for name in seg.nodes:
            node = onnx.NodeProto()
            node.CopyFrom(self._index[name])
            node.name = name
            nodes.append(node)
            reads.update(node_reads(node))
            domains.update(_domains(node))
        initializers = [t for t in self.original.graph.initializer if t.name in reads]
        # Weights of an If branch inlined for this signature are the prepared graph's own.
        known = {t.name for t in self.original.graph.initializer}
        initializers += [
            t
            for t in self.prepared.graph.initializer
            if t.name in reads and t.name not in known and t.data_location != TensorProto.EXTERNAL
        ]
        sparse = [t for t in self.original.graph.sparse_initializer if t.values.name in reads]
        self._link_external(initializers)
        static = seg.device == NPU
        if static:
            nodes, initializers = self._scalars_as_vectors(seg, nodes, initializers)
        sub = helper.make_graph(
            nodes,
            f"{graph.name or 'graph'}-{seg.device}-segment",
            [self._value_info(n, static) for n in seg.inputs],
            [self._value_info(n, static) for n in seg.outputs],
            initializers,
            sparse_initializer=sparse,
        )
        opsets = []
        for imp in self.prepared.opset_import:
            if imp.domain in ("", "ai.onnx"):
                version = imp.version
                if static:
                    # Every op here has the same definition at 19 (placement checked).
                    version = min(version, MAX_OPSET)
                opsets.append(helper.make_opsetid(imp.domain, version))
            elif imp.domain in domains:
                opsets.append(helper.make_opsetid(imp.domain, imp.version))
        model = helper.make_model(sub, opset_imports=opsets)
        model.ir_version = self.prepared.ir_version
        used = {(n.domain, n.op_type) for n in nodes}
        model.functions.extend(f for f in self.prepared.functions if (f.domain, f.name) in used)
        _save(model, path, sum(len(t.raw_data) for t in initializers) > _EMBEDDED_LIMIT)
        self._written.add(path)
        return path

    def remove(self) -> None:
        """Remove the segment files written here (their weights beside them included)."""
        for path in self._written:
            for done in (path, path.with_name(f"{path.stem}.data")):
                try:
                    done.unlink()
                except OSError:
                    pass
        self._written.clear()

    def constants(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The values of initializers among ``names`` (graph outputs no node makes)."""
        wanted = set(names)
        base = str(self.source_dir) if self.source_dir is not None else ""
        return {
            t.name: numpy_helper.to_array(t, base)
            for t in self.original.graph.initializer
            if t.name in wanted
        }

    def _scalars_as_vectors(
        self, seg: Segment, nodes: list[onnx.NodeProto], initializers: list[Any]
    ) -> tuple[list[onnx.NodeProto], list[Any]]:
        """The NPU takes and gives no 0-d tensor (the simulator fails on one): a 0-d input or
        output of an NPU segment is a [1] tensor in its file, reshaped inside."""
        scalars = [n for n in (*seg.inputs, *seg.outputs) if self._static_shape(n) == ()]
        if not scalars:
            return nodes, initializers
        empty, one = "rkort__shape_scalar", "rkort__shape_1"
        initializers = [
            *initializers,
            numpy_helper.from_array(np.zeros(0, np.int64), empty),
            numpy_helper.from_array(np.ones(1, np.int64), one),
        ]
        rename = {}
        head, tail = [], []
        for name in scalars:
            inner = f"{name}__rkort_scalar"
            rename[name] = inner
            if name in seg.inputs:
                head.append(helper.make_node("Reshape", [name, empty], [inner], name=inner))
            else:
                tail.append(helper.make_node("Reshape", [inner, one], [name], name=inner))
        for node in nodes:
            for i, v in enumerate(node.input):
                if v in rename and v in seg.inputs:
                    node.input[i] = rename[v]
            for i, v in enumerate(node.output):
                if v in rename and v in seg.outputs:
                    node.output[i] = rename[v]
        return head + nodes + tail, initializers

    def _static_shape(self, name: str) -> tuple[int, ...] | None:
        t = self.types.get(name)
        return t.static_shape if t is not None else None

    def _value_info(self, name: str, static: bool) -> onnx.ValueInfoProto:
        t = self.types.get(name)
        if static:
            shape = t.static_shape if t is not None else None
            if shape is None:
                raise ValueError(f"the shape of {name!r} is not static")
            return helper.make_tensor_value_info(name, t.elem_type if t else 0, shape or (1,))
        if t is None or t.kind != "tensor":
            vi = onnx.ValueInfoProto()
            vi.name = name
            return vi
        return helper.make_tensor_value_info(name, t.elem_type, None)

    def _link_external(self, initializers: Any) -> None:
        """Make the external-data files these initializers name reachable from the directory."""
        for t in initializers:
            if t.data_location != TensorProto.EXTERNAL:
                continue
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            if location is None or location in self._linked:
                continue
            if self.source_dir is None:
                raise ValueError(
                    f"initializer {t.name!r} is stored in external file {location!r}, but the "
                    "model was given without its path"
                )
            src = (self.source_dir / location).resolve()
            dst = self.directory / location
            if src != dst.resolve():
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists() or dst.is_symlink():
                    dst.unlink()
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            self._linked.add(location)


def _save(model: onnx.ModelProto, path: Path, external: bool = False) -> None:
    """Write ``model`` to ``path`` by a rename (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if external:  # protobuf cannot hold 2 GiB: weights go beside it
        onnx.save(
            model,
            str(tmp),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.stem}.data",
            size_threshold=1024,
        )
    else:
        onnx.save(model, str(tmp))
    os.replace(tmp, path)


def _domains(node: onnx.NodeProto) -> set[str]:
    found = {node.domain}
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in g.node:
                found |= _domains(inner)
    return found
