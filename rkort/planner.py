"""What runs for one input signature: the one decision that warmup, inspect and every session make
(:meth:`Planner.decide`), and its record in the cache.

A decision places every node (:mod:`.rules`), cuts the graph into NPU and CPU segments, and gives
each NPU segment a :class:`~rkort.spec.BuildSpec` and the cache key of its blob. Where a converter
is at hand, the NPU segments are confirmed by building them: a segment the converter refuses has
the node to blame moved to the CPU (:mod:`.trials`) and the plan is made again. A confirmed
decision, verdicts included, is stored as a program record (:mod:`rkort.cache.records`), so a
board without the converter finds the same program and the same blobs.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import onnx

from . import placement
from .cache import Cache, make_key
from .controlflow import INLINED
from .decision import Decision, Part, from_record, to_record
from .face import record_face
from .files import owned_tempdir
from .graph import lower_opset, node_names, prepare
from .model import ModelSource
from .options import RKNNOptions
from .partspec import NotStatic, blob_key, segment_spec, whole_spec
from .platform import toolkit_version
from .quantized import dequantize
from .rules import CPU, NPU, NodePlacement, constant_nodes
from .segment_files import SegmentFiles, lowered_path, segment_path
from .segments import Segment
from .shapes import Signature, signature_of
from .spec import BuildSpec, CompileError, dataset_digest
from .trials import Blame, rejects_graph

log = logging.getLogger("rkort")

#: Bump when a change here makes an older record describe a different program.
PLANNER_VERSION = 2

#: ``build(part)`` builds an NPU part (and may open it); what it returns is handed back.
Build = Callable[["Part"], Any]
#: ``trial(spec)`` builds a spec only to see whether the converter takes it.
Trial = Callable[[BuildSpec], None]


class Planner:
    """Decides programs for one model and one set of provider options.

    ``directory`` receives segment files (a private temporary directory by default, removed with
    the planner). The parsed and lowered model is read on first need: a decision found in the
    cache's records needs neither.
    """

    def __init__(
        self,
        source: ModelSource,
        options: RKNNOptions,
        cache: Cache,
        directory: str | Path | None = None,
        *,
        max_trial_builds: int = 16,
        bisect_limit: int = 128,
    ) -> None:
        self.source = source
        self.options = options
        self.cache = cache
        self.force_cpu = (*options.cpu_ops, *options.cpu_nodes)
        self._directory = Path(directory) if directory is not None else None
        self.max_trial_builds = max_trial_builds
        self.bisect_limit = bisect_limit
        self._files: dict[tuple[tuple[str, tuple[int, ...]], ...], SegmentFiles] = {}

    @property
    def directory(self) -> Path:
        """Where segment files go: made on first need (a model the NPU runs whole needs none)."""
        if self._directory is None:
            self._directory = owned_tempdir("rkort-segments-", create=False)
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._directory), True)
        return self._directory

    def close(self) -> None:
        """Remove the segment files this planner wrote in its own temporary directory."""
        cleanup = getattr(self, "_cleanup", None)
        if cleanup is not None:
            cleanup()

    # -- identity --

    @cached_property
    def model_hash(self) -> str:
        return self.source.content_hash(self.cache)

    @cached_property
    def build_config(self) -> dict[str, Any]:
        """The BuildSpec fields every blob of this planner shares. A quantized build names its
        calibration data by a digest of its content; each part gets a dataset file of its own
        when it is built (:mod:`rkort.calibsets`), so a trial build has none (it is built in
        float16: it only asks whether the converter takes the graph)."""
        o = self.options
        config: dict[str, Any] = {
            "target": o.target,
            "quantized_dtype": o.quantized_dtype,
            "dataset": None if o.quantized_dtype else o.dataset,
            "optimization_level": o.optimization_level,
        }
        if o.quantized_dtype:
            from .calibration import source_digest

            config["quant_algorithm"] = o.quant_algorithm
            config["quant_method"] = o.quant_method
            config["calibration"] = source_digest(o, self.cache, lambda: self.model_hash)
            config["min_cosine"] = o.min_cosine
        return config

    @cached_property
    def config_digest(self) -> str:
        """Everything but the signature that decides what a program is and what its blobs hold."""
        c = self.build_config
        parts = {
            "kind": "program-config",
            "planner": PLANNER_VERSION,
            "target": c["target"],
            "quantized_dtype": c["quantized_dtype"],
            "dataset": dataset_digest(c["dataset"]) if c["quantized_dtype"] else None,
            "optimization_level": c["optimization_level"],
            "force_cpu": sorted(self.force_cpu),
        }
        if c["quantized_dtype"]:
            quantization = ("quant_algorithm", "quant_method", "calibration", "min_cosine")
            parts["quantization"] = {k: c[k] for k in quantization}
        return make_key(parts)

    def record_key(self, signature: Mapping[str, Sequence[int]]) -> str:
        return make_key(
            {
                "kind": "program",
                "model": self.model_hash,
                "config": self.config_digest,
                "signature": sorted([n, [int(d) for d in s]] for n, s in signature.items()),
            }
        )

    # -- the model, read on first need --

    @cached_property
    def _lowered(self) -> tuple[onnx.ModelProto, str | None]:
        """The model as the converter can take it: at opset 19, and a model quantized for
        onnxruntime lowered to float (:mod:`rkort.quantized`); the note says what was done."""
        lowered, note = lower_opset(self.source.proto)
        base = None if self.source.from_bytes else self.source.path.parent
        lowered, quant_note = dequantize(lowered, base_dir=base)
        notes = [n for n in (note, quant_note) if n]
        return lowered, "; ".join(notes) if notes else None

    def files(self, signature: Signature) -> SegmentFiles:
        """The segment files of one signature (the graph prepared for it, memoized)."""
        key = tuple(sorted(signature.items()))
        found = self._files.get(key)
        if found is None:
            lowered = self._lowered[0]
            prepared, types = prepare(lowered, signature)
            found = SegmentFiles(
                lowered,
                prepared,
                types,
                signature,
                None if self.source.from_bytes else self.source.path.parent,
                self.directory,
            )
            self._files[key] = found
        return found

    def forget(self, signature: Mapping[str, Sequence[int]]) -> None:
        """Drop the prepared graph of a signature, and remove the segment files written for it
        (its programs have loaded them; a context opened later writes them again)."""
        files = self._files.pop(tuple(sorted((n, tuple(s)) for n, s in signature.items())), None)
        if files is not None:
            files.remove()

    def drop_model(self) -> None:
        """Let go of the parsed model and everything planned from it (read again on need)."""
        for files in self._files.values():
            files.remove()
        self._files.clear()
        self.__dict__.pop("_lowered", None)
        self.source.drop_graph()

    # -- decisions --

    def recorded(self, signature: Mapping[str, Sequence[int]]) -> Decision | None:
        """The decision the cache holds for ``signature``, if any."""
        body = self.cache.records.get(self.model_hash, self.record_key(signature))
        if body is None or body.get("config") != self.config_digest:
            return None
        try:
            return from_record(body, self._record_paths, self.build_config)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("ignoring a program record of %s: %s", self.source.path.name, e)
            return None

    def warmed(self) -> list[Decision]:
        """Every recorded decision of this model and configuration (the shapes warmed for it)."""
        found = []
        for body in self.cache.records.all(self.model_hash):
            if body.get("config") != self.config_digest:
                continue
            try:
                found.append(from_record(body, self._record_paths, self.build_config))
            except (KeyError, TypeError, ValueError):
                continue
        return found

    def decide(
        self,
        signature: Mapping[str, Sequence[int]],
        build: Build | None = None,
        *,
        trial: Trial | None = None,
        given: Sequence[Segment] | None = None,
    ) -> tuple[Decision, dict[str, Any]]:
        """The program for ``signature`` and what ``build`` returned for its NPU parts (by key).

        Without ``build`` (inspect, a board without the converter) nodes are placed by the rules
        alone, unless the cache holds a record. With it, a record made by the same converter is
        used as is (nothing is built); otherwise every NPU part is built once, refused ones are
        re-placed, and the confirmed decision is recorded. ``trial`` builds segments for the
        bisection that finds which node a converter refuses (default: a compile to a temporary
        file when a converter is installed). ``given`` replaces the first placement with the
        caller's segments (trial builds then correct it).
        """
        shapes = {n: tuple(int(d) for d in s) for n, s in signature.items()}
        if given is None:
            found = self.recorded(shapes)
            if found is not None and (build is None or found.toolkit == toolkit_version()):
                return found, {}
        sig = signature_of(self.source.proto, shapes)
        files = self.files(sig)
        if trial is None and build is not None and toolkit_version() is not None:
            trial = _compile_trial
        state = _Trials(self.max_trial_builds)
        blame = Blame(
            dict(zip(node_names(files.prepared.graph), files.prepared.graph.node)),
            node_names(files.prepared.graph),
            [o.name for o in files.prepared.graph.output],
            {t.name for t in files.prepared.graph.initializer},
            lambda seg: self._prefix_fails(seg, files, trial, state),
            lambda: trial is not None and state.left(),
            self.bisect_limit,
        )
        rejected: dict[str, str] = {}
        handles: dict[str, Any] = {}
        plan = self._given(given, sig, files) if given is not None else self._place(sig, files, {})
        try:
            while True:
                failure: tuple[Segment, CompileError] | None = None
                try:
                    parts = self._parts(plan, sig, files)
                except NotStatic as e:
                    parts, failure = (), (e.segment, e.error)
                if failure is None and build is not None:
                    failure = self._build_parts(parts, files, build, handles, state)
                if failure is None:
                    break
                blamed = blame(failure[0], failure[1], constant_nodes(plan.placements))
                if not set(blamed) - set(rejected):
                    raise failure[1]
                rejected.update(blamed)
                plan = self._place(sig, files, rejected)
        except BaseException:
            _close_all(handles.values())
            raise
        keys = {p.key for p in parts}
        _close_all(h for k, h in handles.items() if k not in keys)
        handles = {k: h for k, h in handles.items() if k in keys}
        decision = Decision(
            signature=sig,
            parts=parts,
            input_names=tuple(sig),
            output_names=tuple(o.name for o in self.source.proto.graph.output),
            rejected=dict(rejected),
            notes=plan.notes,
            trial_builds=state.count,
            plan=plan,
            confirmed=build is not None,
            toolkit=toolkit_version() if build is not None else None,
            npu_flop_share=plan.npu_flop_share,
            cpu_reasons=tuple(sorted({p.reason for p in plan.placements if p.device != NPU}))[:8],
        )
        if build is not None and given is None:
            self.cache.records.put(
                self.model_hash, self.record_key(sig), to_record(decision, self.config_digest)
            )
            record_face(self.cache, self.model_hash, self.source.proto)
        return decision, handles

    def ensure_file(self, decision: Decision, part: Part) -> None:
        """Write the file an NPU part is built from, if it is not the model file itself."""
        if part.source == "model":
            return
        files = self.files(dict(decision.signature))
        if part.source == "lowered":
            files.write_lowered()
        else:
            files.write(part.segment)

    def cpu_file(self, decision: Decision, part: Part) -> Path:
        """The ONNX file a CPU part runs from (written on first need)."""
        return self.files(dict(decision.signature)).write(part.segment)

    def _record_paths(self, source: str, seg: Segment, sig: Signature) -> str:
        """The file a recorded NPU part is built from, on this machine."""
        if source == "model":
            return str(self.source.path)
        if source == "lowered":
            return str(lowered_path(self.directory))
        return str(segment_path(self.directory, seg, sig))

    def place(
        self, signature: Mapping[str, Sequence[int]], rejected: Mapping[str, str] = {}
    ) -> placement.Plan:
        """The placement behind a decision for ``signature`` with these trial-build verdicts."""
        sig = signature_of(self.source.proto, signature)
        return self._place(sig, self.files(sig), rejected)

    # -- inside a decision --

    def _place(
        self, sig: Signature, files: SegmentFiles, rejected: Mapping[str, str]
    ) -> placement.Plan:
        lowered, note = self._lowered
        return placement.plan(
            lowered,
            self.options.target,
            self.force_cpu,
            input_shapes=sig,
            rejected=rejected,
            notes=[note] if note else [],
            prepared=(files.prepared, files.types),
        )

    def _given(
        self, segments: Sequence[Segment], sig: Signature, files: SegmentFiles
    ) -> placement.Plan:
        device = {n: s.device for s in segments for n in s.nodes}
        computed = self._place(sig, files, {})
        placements = tuple(
            p
            if device.get(p.node_name, p.device) == p.device
            else NodePlacement(
                p.node_name, p.op_type, device[p.node_name], "as planned by the caller"
            )
            for p in computed.placements
        )
        return dataclasses.replace(computed, placements=placements, segments=tuple(segments))

    def _parts(self, plan: placement.Plan, sig: Signature, files: SegmentFiles) -> tuple[Part, ...]:
        whole = (
            len(plan.segments) == 1
            and all(p.device == NPU for p in plan.placements)
            and not any(p.key == INLINED for p in files.prepared.metadata_props)
            and not any(  # a 0-d input or output travels as [1]: a segment file says so
                files.types[n].static_shape == ()
                for n in (*plan.segments[0].inputs, *plan.segments[0].outputs)
                if n in files.types
            )
        )
        parts = []
        for seg in plan.segments:
            if seg.device == CPU:
                parts.append(Part(seg))
            elif whole:
                parts.append(self._whole_part(seg, sig, files))
            else:
                spec = self._segment_spec(seg, files)
                parts.append(Part(seg, spec, self.blob_key(spec, "segment", seg.nodes)))
        return tuple(parts)

    def _whole_part(self, seg: Segment, sig: Signature, files: SegmentFiles) -> Part:
        lowered = self._lowered[0] is not self.source.proto
        source = "lowered" if lowered else "model"
        path = files.lowered_path() if lowered else self.source.path
        spec = whole_spec(self.source, sig, files, path, self.build_config)
        whole = Segment(seg.index, NPU, seg.nodes, spec.input_names, spec.output_names)
        return Part(whole, spec, self.blob_key(spec, source, seg.nodes), source)

    def _segment_spec(self, seg: Segment, files: SegmentFiles) -> BuildSpec:
        return segment_spec(seg, files, self.build_config)

    def blob_key(self, spec: BuildSpec, source: str, nodes: Sequence[str]) -> str:
        """The cache key of a blob (see :func:`rkort.partspec.blob_key`)."""
        return blob_key(self.model_hash, spec, source, nodes)

    def _build_parts(
        self,
        parts: Sequence[Part],
        files: SegmentFiles,
        build: Build,
        handles: dict[str, Any],
        state: _Trials,
    ) -> tuple[Segment, CompileError] | None:
        for part in parts:
            if part.device != NPU or part.key in handles:
                continue
            assert part.key is not None
            if part.source == "segment":
                files.write(part.segment)
            elif part.source == "lowered":
                files.write_lowered()
            state.count += 1
            try:
                handles[part.key] = build(part)
            except CompileError as e:
                if not rejects_graph(e):
                    raise
                return part.segment, e
        return None

    def _prefix_fails(
        self, seg: Segment, files: SegmentFiles, trial: Trial | None, state: _Trials
    ) -> bool:
        assert trial is not None
        files.write(seg)
        try:
            spec = self._segment_spec(seg, files)
        except NotStatic:
            return True
        state.count += 1
        try:
            trial(spec)
        except CompileError as e:
            if not rejects_graph(e):
                raise
            return True
        return False


@dataclass
class _Trials:
    limit: int
    count: int = 0

    def left(self) -> bool:
        return self.count < self.limit


def _compile_trial(spec: BuildSpec) -> None:
    from .compiler import compile_blob

    with tempfile.TemporaryDirectory(prefix="rkort-trial-") as tmp:
        compile_blob(spec, Path(tmp) / "trial.rknn", progress=False)


def _close_all(handles: Any) -> None:
    for h in list(handles):
        close = getattr(h, "close", None)
        if callable(close):
            close()
