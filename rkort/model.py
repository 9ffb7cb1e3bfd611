"""The model a session was given: a file on disk (written out when given as bytes), its content
key, and its graph read without external data."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from functools import cached_property
from pathlib import Path

import onnx


class ModelSource:
    """One ONNX model, as a path the converter can read and a content hash for the cache key."""

    def __init__(self, path_or_bytes: str | os.PathLike[str] | bytes) -> None:
        self._bytes: bytes | None = None
        if isinstance(path_or_bytes, bytes):
            self._bytes = path_or_bytes
            tmp = tempfile.mkdtemp(prefix="rkort-model-")
            self._finalizer = weakref.finalize(self, shutil.rmtree, tmp, True)
            self.path = Path(tmp) / "model.onnx"
            self.path.write_bytes(path_or_bytes)
        else:
            self.path = Path(os.fspath(path_or_bytes))

    @cached_property
    def proto(self) -> onnx.ModelProto:
        """The graph, with external tensors left as references (cheap for large external data)."""
        if self._bytes is not None:
            return onnx.load_from_string(self._bytes)
        return onnx.load(str(self.path), load_external_data=False)

    @cached_property
    def external_files(self) -> list[Path]:
        """Files holding this model's external tensor data, in first-use order."""
        seen: dict[Path, None] = {}
        for tensor in _all_tensors(self.proto.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                for item in tensor.external_data:
                    if item.key == "location":
                        seen[self.path.parent / item.value] = None
        return list(seen)

    def content_hash(self, cache) -> str:  # type: ignore[no-untyped-def]
        """Hash of everything that defines the model, memoized by the cache for files on disk."""
        if self._bytes is not None:
            return cache.bytes_hash(self._bytes)
        return cache.hashes.model_hash(self.path, lambda: self.external_files)

    def drop_graph(self) -> None:
        """Let go of the parsed graph (parsed again when next asked for)."""
        self.__dict__.pop("proto", None)

    @property
    def from_bytes(self) -> bool:
        """True for a model given as bytes (its file is a private temporary copy)."""
        return self._bytes is not None

    def onnxruntime_source(self) -> str | bytes:
        """What to give onnxruntime to load this model (bytes for a model given as bytes)."""
        return self._bytes if self._bytes is not None else str(self.path)

    @property
    def opset(self) -> int:
        for imp in self.proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return int(imp.version)
        return 0


def _all_tensors(graph: onnx.GraphProto):  # type: ignore[no-untyped-def]
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(g)
