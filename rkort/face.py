"""A model's face without the model: its inputs, outputs and metadata, recorded in the cache, and a
tiny graph with the same face that onnxruntime loads in place of the whole model.

A session whose model runs on the NPU needs onnxruntime only for what it answers about the model
(``get_inputs()``, ``get_outputs()``, ``get_modelmeta()``, input checks): loading the face instead
of the whole model opens a warmed session without parsing the ONNX file and without a CPU copy of
its weights. The whole model is loaded when a call must run on the CPU.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .cache import Cache, make_key

log = logging.getLogger("rkort")

FACE_FORMAT = 1
#: Overridable initializers larger than this are not copied into a face (the model is loaded).
_MAX_INITIALIZER = 64 << 10


def face_key(model_hash: str) -> str:
    return make_key({"kind": "face", "face_format": FACE_FORMAT, "model": model_hash})


def describe(proto: onnx.ModelProto) -> Optional[dict[str, Any]]:
    """The face of a model as JSON data, or None when it cannot have one (an output that is not a
    tensor, large overridable initializers)."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    overridable = []
    for vi in graph.input:
        t = initializers.get(vi.name)
        if t is None:
            continue
        if (
            t.data_location == onnx.TensorProto.EXTERNAL
            or len(t.SerializeToString()) > _MAX_INITIALIZER
        ):
            return None
        overridable.append(base64.b64encode(t.SerializeToString()).decode())
    for vi in graph.output:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.elem_type:
            return None
    return {
        "format": FACE_FORMAT,
        "ir_version": proto.ir_version,
        "opset_import": [[o.domain, o.version] for o in proto.opset_import],
        "producer_name": proto.producer_name,
        "producer_version": proto.producer_version,
        "domain": proto.domain,
        "model_version": proto.model_version if proto.HasField("model_version") else None,
        "doc_string": proto.doc_string,
        "graph_name": graph.name,
        "graph_doc_string": graph.doc_string,
        "metadata_props": [[p.key, p.value] for p in proto.metadata_props],
        "inputs": [base64.b64encode(vi.SerializeToString()).decode() for vi in graph.input],
        "outputs": [base64.b64encode(vi.SerializeToString()).decode() for vi in graph.output],
        "initializers": overridable,
    }


def face_model(face: dict[str, Any]) -> bytes:
    """A small model with the recorded face: the same inputs and outputs (each output a constant
    of its declared type, dynamic dims 1), the same metadata."""
    inputs = [_parse(onnx.ValueInfoProto, b) for b in face["inputs"]]
    outputs = [_parse(onnx.ValueInfoProto, b) for b in face["outputs"]]
    initializers = [_parse(onnx.TensorProto, b) for b in face["initializers"]]
    names = {vi.name for vi in inputs}
    nodes = []
    for i, vi in enumerate(outputs):
        if vi.name in names:
            continue  # an input given back as it is
        tt = vi.type.tensor_type
        rank = len(tt.shape.dim)
        zero = numpy_helper.from_array(np.zeros([1], helper.tensor_dtype_to_np_dtype(tt.elem_type)))
        if rank == 0 or not tt.HasField("shape"):
            nodes.append(helper.make_node("Constant", [], [vi.name], value=zero))
            continue
        # A shape only known at run time (never run): shape inference keeps the declared dims.
        nodes += [
            helper.make_node("RandomUniform", [], [f"_face_r{i}"], shape=[rank]),
            helper.make_node("Cast", [f"_face_r{i}"], [f"_face_s{i}"], to=onnx.TensorProto.INT64),
            helper.make_node("Constant", [], [f"_face_z{i}"], value=zero),
            helper.make_node("Reshape", [f"_face_z{i}", f"_face_s{i}"], [vi.name]),
        ]
    graph = helper.make_graph(nodes, face["graph_name"], inputs, outputs, initializers)
    graph.doc_string = face["graph_doc_string"]
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in face["opset_import"]]
    )
    model.ir_version = face["ir_version"]
    model.producer_name = face["producer_name"]
    model.producer_version = face["producer_version"]
    model.domain = face["domain"]
    if face["model_version"] is not None:
        model.model_version = face["model_version"]
    model.doc_string = face["doc_string"]
    for key, value in face["metadata_props"]:
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def recorded_face(cache: Cache, model_hash: str) -> Optional[bytes]:
    """The face model of a model whose face the cache holds, else None."""
    key = face_key(model_hash)
    path = cache.records.path(model_hash, key)
    try:
        st = os.stat(path, follow_symlinks=False)
        stamp: Any = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        stamp = None
    made = _MADE.get(str(path))
    if stamp is not None and made is not None and made[0] == stamp:
        return made[1]  # the face this process made from this very record file
    body = cache.records.get(model_hash, key)
    if body is None or body.get("format") != FACE_FORMAT:
        return None
    try:
        face = face_model(body)
    except Exception as e:  # noqa: BLE001 - a face that cannot be made: load the model instead
        log.debug("the recorded face of model %s cannot be used: %s", model_hash[:12], e)
        return None
    if stamp is not None:
        if len(_MADE) > 64:
            _MADE.clear()
        _MADE[str(path)] = (stamp, face)
    return face


#: Faces made from record files, by the file's path: (its stat then, the face model).
_MADE: dict[str, tuple[Any, bytes]] = {}


def record_face(cache: Cache, model_hash: str, proto: onnx.ModelProto) -> None:
    """Keep the face of ``proto`` in the cache, when it has one and the cache has none yet (a
    face is an optimisation: a failure here is logged, never raised)."""
    try:
        if cache.records.get(model_hash, face_key(model_hash)) is not None:
            return
        face = describe(proto)
        if face is not None:
            cache.records.put(model_hash, face_key(model_hash), face)
    except Exception as e:  # noqa: BLE001 - sessions open on the whole model then
        log.debug("could not record the face of model %s: %s", model_hash[:12], e)


def face_session_options() -> Any:
    """onnxruntime options of a shared face session: it answers questions about the model and
    never runs it (no thread pools, no graph optimizations)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


class SharedFaces:
    """onnxruntime sessions of model faces, shared by the sessions of this process that open on
    the same face with the same CPU providers and no session options of their own.

    A face session only answers questions about the model (it never runs it), so one serves
    every such session: re-opening a warmed model creates no onnxruntime session (and no
    onnxruntime thread pool) after the first. Kept for the ``limit`` faces used last.
    """

    def __init__(self, limit: int = 16) -> None:
        self._limit = limit
        self._states: OrderedDict[tuple[bytes, str], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def adopt(self, session: Any, face: bytes, cpu_args: Any, create: Callable[[], None]) -> None:
        """Give ``session`` onnxruntime's state for ``face``: the shared one if this process
        has it, else what ``create()`` (onnxruntime's own session creation) sets, then shared."""
        key = (hashlib.sha256(face).digest(), repr(cpu_args))
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
        if state is not None:
            # Lists and dicts copied: a session changes its own providers later.
            session.__dict__.update(
                {k: (v.copy() if isinstance(v, (list, dict)) else v) for k, v in state.items()}
            )
            return
        before = dict(session.__dict__)
        create()
        state = {
            k: (v.copy() if isinstance(v, (list, dict)) else v)
            for k, v in session.__dict__.items()
            if k not in before or before[k] is not v
        }
        with self._lock:
            self._states[key] = state
            while len(self._states) > self._limit:
                self._states.popitem(last=False)


#: The face sessions this process shares (see :class:`SharedFaces`).
SHARED = SharedFaces()


def _parse(cls: Any, text: str) -> Any:
    message = cls()
    message.ParseFromString(base64.b64decode(text))
    return message
