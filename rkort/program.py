"""A model cut into NPU and CPU segments for one static input signature, and run in order.

Each segment is written out as a small ONNX model of its own (external weights stay external, in
links to the original files): NPU segments get a :class:`~rkort.compiler.BuildSpec` with static
shapes and run on whatever Runner the caller's ``open_npu`` returns; CPU segments run on an
onnxruntime CPU session. A model whose every node goes to the NPU is one segment with the same
BuildSpec the whole-model path makes (the original file, its inputs and outputs).

When a build of an NPU segment fails (:class:`~rkort.compiler.BuildFailed`, or the converter
aborting on the graph, :class:`~rkort.compiler.ConverterCrashed`), the node the
toolkit's message names, or else the node a bisection of the segment finds, is placed on the CPU
and the plan is redone; a segment too large to bisect goes to the CPU whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import placement
from .backends.base import Runner, RunnerClosed
from .compiler import BuildFailed, BuildSpec, CompileError, ConverterCrashed
from .feed import cast_output
from .placement import CPU, NPU, NodePlacement, Plan, Segment, TensorType

log = logging.getLogger("rkort")

#: Part of every segment file's name: bump when extraction changes what a segment file holds, so
#: blobs cached under a segment's name are not reused for a different graph.
SEGMENT_FORMAT = 1
_EMBEDDED_LIMIT = 1 << 30

ModelArg = Union[onnx.ModelProto, str, "os.PathLike[str]"]
SegmentHook = Callable[["ProgramSegment", int, int], None]


class ProgramSegment:
    """One segment, ready to run: an NPU Runner or an onnxruntime CPU session."""

    def __init__(
        self,
        segment: Segment,
        model_path: Path,
        output_dtypes: Sequence[np.dtype],
        *,
        spec: BuildSpec | None = None,
        runner: Runner | None = None,
        session: Any = None,
    ) -> None:
        self.segment = segment
        self.model_path = model_path
        self.spec = spec
        self.runner = runner
        self.session = session
        self.output_dtypes = tuple(output_dtypes)

    @property
    def index(self) -> int:
        return self.segment.index

    @property
    def device(self) -> str:
        return self.segment.device

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.segment.nodes

    @property
    def node_count(self) -> int:
        return len(self.segment.nodes)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.segment.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.segment.outputs

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The segment's outputs (in ``outputs`` order, declared dtypes) for its inputs."""
        if self.runner is not None:
            outs = self.runner.run([np.ascontiguousarray(a) for a in arrays])
            return [cast_output(o, dt) for o, dt in zip(outs, self.output_dtypes)]
        if self.session is None:
            raise RunnerClosed(f"segment {self.index} ({self.device}) is closed")
        return list(self.session.run(list(self.outputs), dict(zip(self.inputs, arrays))))

    def close(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()
        self.session = None

    def __repr__(self) -> str:
        return (
            f"<ProgramSegment {self.index} {self.device} {self.node_count} nodes "
            f"{list(self.inputs)} -> {list(self.outputs)}>"
        )


class Program:
    """A partitioned model for one static input signature.

    ``model`` is a path (best: the whole-model BuildSpec then names it) or a ModelProto (loaded
    without external data is fine; give ``model_path`` so external data and the whole-model
    BuildSpec can find the file). ``model_dir`` receives the segment files. ``input_shapes``
    fixes every input's shape (inputs with static declared shapes may be left out).
    ``segments`` is an initial plan (None: :func:`rkort.placement.plan` makes one). ``open_npu``
    compiles a BuildSpec and opens a Runner for it. The build options (``target``,
    ``float_dtype``, ``quantized_dtype``, ``dataset``, ``optimization_level``) go into every
    BuildSpec; ``force_cpu`` holds op types and node names for the CPU; ``sess_options`` is used
    for the CPU segments' onnxruntime sessions. A failed build re-places nodes (see the module
    docstring): at most ``max_trial_builds`` builds go to bisection, and only segments of at
    most ``bisect_limit`` nodes are bisected.

    After construction: ``segments`` (:class:`ProgramSegment`, in run order), ``placements`` and
    ``plan`` (the final ones), ``rejected`` (node -> why a build refused it), ``trial_builds``,
    ``notes``, ``input_names``, ``input_shapes``, ``output_names``, ``output_dtypes``.
    """

    def __init__(
        self,
        model: ModelArg,
        model_dir: str | os.PathLike[str],
        input_shapes: Mapping[str, Sequence[int]],
        segments: Sequence[Segment] | None = None,
        open_npu: Callable[[BuildSpec], Runner] | None = None,
        *,
        target: str = "rk3588",
        float_dtype: str = "float16",
        quantized_dtype: str | None = None,
        dataset: str | None = None,
        optimization_level: int = 3,
        force_cpu: Collection[str] = (),
        model_path: str | os.PathLike[str] | None = None,
        sess_options: Any = None,
        max_trial_builds: int = 16,
        bisect_limit: int = 128,
    ) -> None:
        if open_npu is None:
            raise TypeError("Program needs open_npu, a function from a BuildSpec to a Runner")
        if isinstance(model, onnx.ModelProto):
            proto = model
            path = Path(os.fspath(model_path)) if model_path is not None else None
        else:
            path = Path(os.fspath(model))
            proto = onnx.load(str(path), load_external_data=False)
        self.model_dir = Path(os.fspath(model_dir))
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.target = target.lower()
        self._build_options: dict[str, Any] = {
            "target": self.target,
            "float_dtype": float_dtype,
            "quantized_dtype": quantized_dtype,
            "dataset": dataset,
            "optimization_level": optimization_level,
        }
        self._open_npu = open_npu
        self._force_cpu = tuple(force_cpu)
        self._sess_options = sess_options
        self._source_dir = path.parent if path is not None else None
        self._linked: set[str] = set()
        self._written: set[Path] = set()
        self.trial_builds = 0
        self._max_trial_builds = max_trial_builds
        self._bisect_limit = bisect_limit

        initializers = {t.name for t in proto.graph.initializer}
        self.input_names = tuple(i.name for i in proto.graph.input if i.name not in initializers)
        self.output_names = tuple(o.name for o in proto.graph.output)
        self.input_shapes = _signature(proto, self.input_names, input_shapes)

        lowered, note = placement.lower_opset(proto)
        self.notes: list[str] = [note] if note else []
        self._whole_path: Path | None = path
        if lowered is not proto:
            self._whole_path = None  # the file is not what runs; write the lowered model
        self._original = lowered
        self._op_types = dict(
            zip(placement.node_names(lowered.graph), (n.op_type for n in lowered.graph.node))
        )
        self._model, self._types = placement.prepare(lowered, self.input_shapes)
        self._names = placement.node_names(self._model.graph)
        self._index = dict(zip(self._names, self._model.graph.node))
        self.output_dtypes = tuple(
            _np_dtype(self._types.get(n, TensorType("unknown"))) for n in self.output_names
        )
        self._constants = self._constant_outputs()

        self._closed = False
        self.rejected: dict[str, str] = {}
        self._runners: dict[BuildSpec, Runner] = {}
        self.segments: list[ProgramSegment] = []
        try:
            self.plan = self._build(segments)
        except BaseException:
            for runner in self._runners.values():
                runner.close()
            raise
        used = {s.spec for s in self.segments if s.spec is not None}
        for spec, runner in self._runners.items():
            if spec not in used:
                runner.close()
        self._runners.clear()
        self.placements = self.plan.placements
        self._release_after = self._last_uses()

    # -- running --

    def run(
        self, inputs: Sequence[np.ndarray], on_segment: SegmentHook | None = None
    ) -> list[np.ndarray]:
        """Graph inputs in order -> graph outputs in order. ``on_segment(segment, start_ns,
        end_ns)`` is called after each segment (``time.perf_counter_ns`` clock)."""
        if self._closed:
            raise RunnerClosed("this program is closed")
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"this program takes {len(self.input_names)} inputs {list(self.input_names)}, "
                f"got {len(inputs)}"
            )
        env: dict[str, Any] = dict(self._constants)
        for name, array in zip(self.input_names, inputs):
            shape = self.input_shapes[name]
            if tuple(np.shape(array)) != shape:
                raise ValueError(
                    f"input {name!r} has shape {list(np.shape(array))}; this program was "
                    f"planned for {list(shape)}"
                )
            env[name] = array
        for seg in self.segments:
            feed = [env[n] for n in seg.inputs]
            started = time.perf_counter_ns()
            outs = seg.run(feed)
            ended = time.perf_counter_ns()
            if on_segment is not None:
                on_segment(seg, started, ended)
            env.update(zip(seg.outputs, outs))
            for name in self._release_after.get(seg.index, ()):
                env.pop(name, None)
        return [env[n] for n in self.output_names]

    def close(self) -> None:
        """Close every NPU runner and drop the CPU sessions."""
        self._closed = True
        for seg in self.segments:
            seg.close()

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def npu_segments(self) -> list[ProgramSegment]:
        return [s for s in self.segments if s.device == NPU]

    def __repr__(self) -> str:
        kinds = ", ".join(f"{s.device}:{s.node_count}" for s in self.segments)
        return f"<Program {len(self.segments)} segments [{kinds}]>"

    # -- planning and building --

    def _plan(self) -> Plan:
        made = placement.plan(
            self._model,
            self.target,
            self._force_cpu,
            input_shapes=self.input_shapes,
            rejected=self.rejected,
            notes=self.notes,
        )
        # Report the op types of the model as given (planning turns some into Constants).
        return dataclasses.replace(
            made,
            placements=tuple(
                dataclasses.replace(p, op_type=self._op_types.get(p.node_name, p.op_type))
                for p in made.placements
            ),
        )

    def _build(self, given: Sequence[Segment] | None) -> Plan:
        if given is not None:
            current = self._given_plan(given)
        else:
            current = self._plan()
        while True:
            failed = self._open_segments(current)
            if failed is None:
                return current
            segment, error = failed
            self._reject(segment, error, current)
            current = self._plan()

    def _given_plan(self, segments: Sequence[Segment]) -> Plan:
        device = {n: s.device for s in segments for n in s.nodes}
        computed = self._plan()
        placements = tuple(
            p
            if device.get(p.node_name, p.device) == p.device
            else NodePlacement(
                p.node_name, p.op_type, device[p.node_name], "as planned by the caller"
            )
            for p in computed.placements
        )
        return Plan(
            placements,
            tuple(segments),
            computed.flops,
            computed.params_npu,
            computed.params_total,
            computed.notes,
        )

    def _open_segments(self, current: Plan) -> tuple[Segment, CompileError] | None:
        """Open every segment of ``current``; the first NPU segment whose build fails, or None."""
        self.segments = []
        whole = self._whole_segment(current)
        for seg in current.segments:
            if seg.device == CPU:
                path = self._write_segment(seg, CPU)
                session = _cpu_session(path, self._sess_options)
                dtypes = [_np_dtype(self._types.get(n, TensorType("unknown"))) for n in seg.outputs]
                self.segments.append(ProgramSegment(seg, path, dtypes, session=session))
                continue
            try:
                if whole is not None:
                    path, spec = whole
                    seg = Segment(seg.index, NPU, seg.nodes, self.input_names, self.output_names)
                else:
                    path = self._write_segment(seg, NPU)
                    spec = self._spec(seg, path)
                runner = self._runner(spec)
            except (BuildFailed, ConverterCrashed) as e:
                if not _rejects_graph(e):
                    raise
                return seg, e
            dtypes = [np.dtype(d) for d in spec.output_dtypes]
            self.segments.append(ProgramSegment(seg, path, dtypes, spec=spec, runner=runner))
        return None

    def _runner(self, spec: BuildSpec) -> Runner:
        runner = self._runners.get(spec)
        if runner is None:
            self.trial_builds += 1
            runner = self._open_npu(spec)
            self._runners[spec] = runner
        return runner

    def _whole_segment(self, current: Plan) -> tuple[Path, BuildSpec] | None:
        """(file, spec) when one NPU segment holds every node: the whole-model BuildSpec."""
        if len(current.segments) != 1 or current.segments[0].device != NPU:
            return None
        if any(p.device != NPU for p in current.placements):
            return None
        path = self._whole_path
        if path is None:
            path = self.model_dir / f"model-opset{placement.MAX_OPSET}.onnx"
            self._link_external(self._original.graph.initializer)
            onnx.save(self._original, str(path))
        declared = _declared(self._original)
        all_static = all(declared[n].static_shape == self.input_shapes[n] for n in self.input_names)
        output_shapes = []
        for name in self.output_names:
            shape = declared[name].static_shape if all_static else None
            if shape is None:
                shape = self._static(name)
            output_shapes.append(shape)
        spec = BuildSpec(
            model_path=str(path),
            input_names=self.input_names,
            input_shapes=tuple(self.input_shapes[n] for n in self.input_names),
            input_dtypes=tuple(_np_dtype(declared[n]).name for n in self.input_names),
            output_names=self.output_names,
            output_shapes=tuple(output_shapes),
            output_dtypes=tuple(_np_dtype(declared[n]).name for n in self.output_names),
            **self._build_options,
        )
        return path, spec

    def _spec(self, seg: Segment, path: Path) -> BuildSpec:
        return BuildSpec(
            model_path=str(path),
            input_names=seg.inputs,
            input_shapes=tuple(self._static(n) for n in seg.inputs),
            input_dtypes=tuple(self._dtype(n).name for n in seg.inputs),
            output_names=seg.outputs,
            output_shapes=tuple(self._static(n) for n in seg.outputs),
            output_dtypes=tuple(self._dtype(n).name for n in seg.outputs),
            **self._build_options,
        )

    def _static(self, name: str) -> tuple[int, ...]:
        t = self._types.get(name)
        shape = t.static_shape if t is not None else None
        if shape is None:
            raise BuildFailed(
                f"the shape of '{name}' cannot be inferred statically for the input shapes "
                f"{dict(self.input_shapes)}",
                stage="planning",
            )
        return shape

    def _dtype(self, name: str) -> np.dtype:
        t = self._types.get(name)
        if t is None or t.kind != "tensor" or not t.elem_type:
            raise BuildFailed(f"the type of '{name}' cannot be inferred", stage="planning")
        return _np_dtype(t)

    # -- when a build fails --

    def _reject(self, seg: Segment, error: CompileError, current: Plan) -> None:
        constant = placement.constant_nodes(current.placements)
        work = [n for n in seg.nodes if n not in constant]
        message = _short(error)
        named = _named_nodes(error, work, self._index)
        if named:
            for n in named:
                self.rejected[n] = f"a trial build rejects it: {message}"
            log.info("NPU build of segment %d failed at %s; those go to the CPU", seg.index, named)
            return
        culprit = None
        if 1 < len(work) <= self._bisect_limit:
            culprit = self._bisect(work, constant)
        if culprit is None and len(work) == 1:
            culprit = work[0]
        if culprit is not None:
            self.rejected[culprit] = f"a trial build rejects it: {message}"
            log.info(
                "NPU build of segment %d failed; bisection blames %s, which goes to the CPU",
                seg.index,
                culprit,
            )
            return
        for n in work:
            self.rejected[n] = f"a trial build rejects its segment: {message}"
        log.info("NPU build of segment %d failed; its %d nodes go to the CPU", seg.index, len(work))

    def _bisect(self, work: list[str], constant: set[str]) -> str | None:
        """The first node whose prefix of the segment fails to build (the whole segment fails)."""
        lo, hi = 0, len(work) - 1
        while lo < hi:
            if self.trial_builds >= self._max_trial_builds:
                return None
            mid = (lo + hi) // 2
            if self._prefix_fails(work[: mid + 1], constant):
                hi = mid
            else:
                lo = mid + 1
        return work[hi]

    def _prefix_fails(self, prefix: list[str], constant: set[str]) -> bool:
        seg = self._sub_segment(prefix, constant)
        path = self._write_segment(seg, NPU)
        try:
            spec = self._spec(seg, path)
            self.trial_builds += 1
            runner = self._open_npu(spec)
        except (BuildFailed, ConverterCrashed) as e:
            if not _rejects_graph(e):
                raise
            return True
        runner.close()
        return False

    def _sub_segment(self, names: list[str], constant: set[str]) -> Segment:
        graph = self._model.graph
        producer = {o: n for n, node in self._index.items() for o in node.output if o}
        own = set(names)
        stack = [
            producer[r]
            for n in names
            for r in placement.node_reads(self._index[n])
            if r in producer
        ]
        while stack:
            p = stack.pop()
            if p in constant and p not in own:
                own.add(p)
                stack.extend(
                    producer[r] for r in placement.node_reads(self._index[p]) if r in producer
                )
        ordered = [n for n in self._names if n in own]
        made = {o for n in ordered for o in self._index[n].output if o}
        initializers = {t.name for t in graph.initializer}
        inputs: list[str] = []
        for n in ordered:
            for r in placement.node_reads(self._index[n]):
                if r not in made and r not in initializers and r not in inputs:
                    inputs.append(r)
        read_elsewhere = {
            r for n, node in self._index.items() if n not in own for r in placement.node_reads(node)
        } | set(self.output_names)
        outputs = [o for n in names for o in self._index[n].output if o and o in read_elsewhere]
        if not outputs:
            outputs = [o for o in self._index[names[-1]].output if o]
        return Segment(-1, NPU, tuple(ordered), tuple(inputs), tuple(outputs))

    # -- segment files --

    def _write_segment(self, seg: Segment, device: str) -> Path:
        shapes = sorted(self.input_shapes.items())
        digest = hashlib.sha256(
            repr((SEGMENT_FORMAT, device, seg.nodes, seg.inputs, seg.outputs, shapes)).encode()
        ).hexdigest()[:16]
        path = self.model_dir / f"segment-{device}-{digest}.onnx"
        if path in self._written:
            return path
        graph = self._model.graph
        nodes = []
        reads: set[str] = set()
        domains: set[str] = set()
        for name in seg.nodes:
            node = onnx.NodeProto()
            node.CopyFrom(self._index[name])
            node.name = name
            nodes.append(node)
            reads.update(placement.node_reads(node))
            domains.update(_domains(node))
        initializers = [t for t in self._original.graph.initializer if t.name in reads]
        sparse = [t for t in self._original.graph.sparse_initializer if t.values.name in reads]
        self._link_external(initializers)
        static = device == NPU
        sub = helper.make_graph(
            nodes,
            f"{graph.name or 'graph'}-{device}-segment",
            [self._value_info(n, static) for n in seg.inputs],
            [self._value_info(n, static) for n in seg.outputs],
            initializers,
            sparse_initializer=sparse,
        )
        opsets = []
        for imp in self._model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                version = imp.version
                if device == NPU:
                    # Every op here has the same definition at 19 (placement checked).
                    version = min(version, placement.MAX_OPSET)
                opsets.append(helper.make_opsetid(imp.domain, version))
            elif imp.domain in domains:
                opsets.append(helper.make_opsetid(imp.domain, imp.version))
        model = helper.make_model(sub, opset_imports=opsets)
        model.ir_version = self._model.ir_version
        used = {(n.domain, n.op_type) for n in nodes}
        model.functions.extend(f for f in self._model.functions if (f.domain, f.name) in used)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        embedded = sum(len(t.raw_data) for t in initializers)
        if embedded > _EMBEDDED_LIMIT:  # protobuf cannot hold 2 GiB: weights go beside it
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
        self._written.add(path)
        return path

    def _value_info(self, name: str, static: bool) -> onnx.ValueInfoProto:
        t = self._types.get(name)
        if static:
            return helper.make_tensor_value_info(name, t.elem_type if t else 0, self._static(name))
        if t is None or t.kind != "tensor":
            vi = onnx.ValueInfoProto()
            vi.name = name
            return vi
        return helper.make_tensor_value_info(name, t.elem_type, None)

    def _link_external(self, initializers: Any) -> None:
        """Make the external-data files these initializers name reachable from model_dir."""
        for t in initializers:
            if t.data_location != TensorProto.EXTERNAL:
                continue
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            if location is None or location in self._linked:
                continue
            if self._source_dir is None:
                raise ValueError(
                    f"initializer {t.name!r} is stored in external file {location!r}, but the "
                    "model was given without its path; pass model_path"
                )
            src = (self._source_dir / location).resolve()
            dst = self.model_dir / location
            if src != dst.resolve():
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists() or dst.is_symlink():
                    dst.unlink()
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            self._linked.add(location)

    # -- helpers --

    def _constant_outputs(self) -> dict[str, np.ndarray]:
        """Graph outputs that are initializers (no node makes them)."""
        from onnx import numpy_helper

        wanted = set(self.output_names) - set(self.input_names)
        found = {}
        for t in self._original.graph.initializer:
            if t.name in wanted:
                base = str(self._source_dir) if self._source_dir is not None else ""
                found[t.name] = numpy_helper.to_array(t, base)
        return found

    def _last_uses(self) -> dict[int, list[str]]:
        """For each segment, the values no later segment reads (freed after it runs)."""
        last: dict[str, int] = {}
        for seg in self.segments:
            for n in seg.inputs:
                last[n] = seg.index
        keep = set(self.output_names)
        out: dict[int, list[str]] = {}
        for name, index in last.items():
            if name not in keep:
                out.setdefault(index, []).append(name)
        return out


def _signature(
    proto: onnx.ModelProto, names: Sequence[str], given: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, ...]]:
    unknown = set(given) - set(names)
    if unknown:
        raise ValueError(f"no input named {sorted(unknown)}; the inputs are {list(names)}")
    declared = _declared(proto)
    shapes = {}
    for name in names:
        d = declared[name]
        if name in given:
            shape = tuple(int(x) for x in given[name])
            if d.shape is not None and (
                len(d.shape) != len(shape)
                or any(isinstance(a, int) and a != b for a, b in zip(d.shape, shape))
            ):
                raise ValueError(
                    f"shape {list(shape)} does not fit input {name!r} of shape {list(d.shape)}"
                )
        else:
            static = d.static_shape
            if static is None:
                raise ValueError(f"input {name!r} has dynamic shape {d.shape}; give its shape")
            shape = static
        shapes[name] = shape
    return shapes


def _declared(proto: onnx.ModelProto) -> dict[str, TensorType]:
    out = {}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        out[vi.name] = placement._type_of(vi.type)
    return out


def _np_dtype(t: TensorType) -> np.dtype:
    if t.kind != "tensor" or not t.elem_type:
        return np.dtype(object)
    return np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))


def _domains(node: onnx.NodeProto) -> set[str]:
    found = {node.domain}
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in g.node:
                found |= _domains(inner)
    return found


def _cpu_session(path: Path, sess_options: Any) -> Any:
    # onnxruntime's own class, even when rkort.install() has put rkort's in its place.
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    return InferenceSession(str(path), sess_options, providers=["CPUExecutionProvider"])


def _rejects_graph(error: CompileError) -> bool:
    """A refusal or an abort of the converter on this graph; not a process killed from outside
    (SIGKILL: out of memory) or a missing toolkit."""
    if isinstance(error, BuildFailed):
        return True
    return isinstance(error, ConverterCrashed) and "SIGKILL" not in str(error)


_NAMED = re.compile(r"(\w+)\('([^']+)'\)")


def _named_nodes(
    error: CompileError, candidates: Sequence[str], index: Mapping[str, onnx.NodeProto]
) -> list[str]:
    """Nodes of ``candidates`` the toolkit's message names as ``OpType('name')`` (by node name or
    output name; the toolkit suffixes rewritten nodes with '#1')."""
    text = " ".join([str(error), *error.toolkit_errors])
    found: list[str] = []
    for op, ref in _NAMED.findall(text):
        ref = ref.split("#")[0]
        for name in candidates:
            node = index[name]
            if node.op_type == op and (name == ref or ref in node.output) and name not in found:
                found.append(name)
    return found


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."
