"""Calibration sets per NPU part: the user's feeds padded to the part's bucket signature exactly
as a session pads them, run through the model on the CPU up to the part's own inputs, split into
calibration and held-out samples, and written as the toolkit's dataset file.

Which feeds a bucket gets: every feed that fits it, padded as a session pads an input of that
size into it (a session sends a shorter input to this bucket when no smaller one is compiled,
and a board sends it to the smallest warmed shape it fits). A feed that does not fit (longer
than the bucket, another image size) is not used for it: cutting an array would make up an
input nobody sends. Text is the exception: it is tokenized for the bucket, so a longer text is
cut by its tokenizer exactly as the tokenizer cuts it for a model of that length. Along a padded
batch, the rows of the feeds fill each batch as real batches fill it (the last one padded as a
session pads a short batch).

Held out for measuring (never calibrated on): about one feed in five, at most
:data:`MAX_HELD_OUT` samples. The part's reference outputs are onnxruntime's on the graph the
part was cut from. The samples of a set live in the cache, beside the blobs built from them
(``calibration/sets/<digest>/``, private), because a board rehearsal builds the blob again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx

from .accuracy import Figures, compare
from .buckets import NotWarmed, Oversize, RunPlan, ShapePolicy
from .calibration import CalibrationSource
from .decision import Part
from .files import owned_tempdir
from .graph import node_names
from .padding import make_policy
from .planner import Planner
from .segments import Segment
from .shapes import declared_types
from .spec import CalibrationError

#: At most this many held-out samples are measured (a simulator run each).
MAX_HELD_OUT = 8
#: At most this many samples calibrate a part (the toolkit's own advice: 20 to 100).
MAX_CALIBRATION = 64


@dataclass
class PartSet:
    """The calibration of one NPU part for one signature."""

    #: The toolkit's dataset file (one sample a line, one .npy per input of the part).
    dataset: Path
    calibration_samples: int
    #: The part's inputs for each measured sample, and onnxruntime's outputs of the part.
    held_inputs: list[list[np.ndarray]] = field(default_factory=list)
    held_reference: list[list[np.ndarray]] = field(default_factory=list)
    #: True when no feed was left to hold out (or none fits): measured on calibration samples.
    in_sample: bool = False
    source: str = ""
    _slice: Callable[[list[np.ndarray], int], list[np.ndarray]] | None = None

    @property
    def held_out(self) -> int:
        return len(self.held_inputs)

    def measure(
        self, names: Sequence[str], run: Callable[[list[np.ndarray]], list[np.ndarray]]
    ) -> Figures:
        """Run each held-out sample through ``run`` (the built part) and compare its outputs
        with onnxruntime's, as a session returns them (padding sliced off)."""
        got, want = [], []
        for k, (inputs, reference) in enumerate(zip(self.held_inputs, self.held_reference)):
            outs = [np.asarray(o) for o in run(inputs)]
            got.append(self._slice(outs, k) if self._slice else outs)
            want.append(self._slice(list(reference), k) if self._slice else list(reference))
        return compare(names, want, got, self.in_sample)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "samples": self.calibration_samples,
            "held_out": 0 if self.in_sample else self.held_out,
            "in_sample": self.in_sample,
        }


def part_set(planner: Planner, signature: Mapping[str, Sequence[int]], part: Part) -> PartSet:
    """The calibration set of ``part`` (an NPU part of the decision for ``signature``); raises
    :class:`CalibrationError` when the data gives nothing for it."""
    assert part.spec is not None
    return _calibrator(planner).part_set({n: tuple(s) for n, s in signature.items()}, part)


_CALIBRATORS: weakref.WeakKeyDictionary[Planner, _Calibrator] = weakref.WeakKeyDictionary()


def _calibrator(planner: Planner) -> _Calibrator:
    found = _CALIBRATORS.get(planner)
    if found is None:
        found = _CALIBRATORS[planner] = _Calibrator(planner)
    return found


def input_args(proto: onnx.ModelProto) -> tuple[list[Any], list[Any]]:
    """The model's inputs and outputs as onnxruntime describes them (name, shape, type)."""
    initializers = {t.name for t in proto.graph.initializer}
    types = declared_types(proto)

    def arg(name: str) -> Any:
        t = types[name]
        elem = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else "undefined"
        return SimpleNamespace(name=name, shape=list(t.shape or ()), type=f"tensor({elem})")

    inputs = [arg(i.name) for i in proto.graph.input if i.name not in initializers]
    return inputs, [arg(o.name) for o in proto.graph.output]


@dataclass
class _Sample:
    arrays: list[np.ndarray]
    sizes: dict[str, int]
    held: bool


class _Calibrator:
    """The feeds and shape rules of one planner's model, read once."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner
        proto = planner.source.proto
        inputs, outputs = input_args(proto)
        self.names = [i.name for i in inputs]
        self.output_names = [o.name for o in outputs]
        self.policy: ShapePolicy = make_policy(
            planner.source, inputs, outputs, planner.options, planner.cache
        )
        self.source = CalibrationSource(planner.options, planner.cache, planner.model_hash, inputs)

    def part_set(self, signature: dict[str, tuple[int, ...]], part: Part) -> PartSet:
        spec = part.spec
        assert spec is not None
        if self.source.kind == "dataset" and self.policy.static and part.source != "segment":
            return self._given_dataset(signature, part)
        samples = self._samples(signature)
        held = [s for s in samples if s.held][:MAX_HELD_OUT]
        calibrate = [s for s in samples if not s.held][:MAX_CALIBRATION]
        in_sample = not held or not calibrate
        if not calibrate:
            calibrate = held
        if not held:
            held = calibrate[:MAX_HELD_OUT]
        inputs, outputs = self._run(signature, part, [*calibrate, *held])
        n = len(calibrate)
        dataset = _write_set(self.planner, inputs[:n])
        whole = tuple(part.outputs) == tuple(self.output_names) and part.source != "segment"
        sizes = [s.sizes for s in held]
        policy = self.policy
        return PartSet(
            dataset,
            n,
            inputs[n:],
            outputs[n:],
            in_sample,
            self.source.describe(),
            (lambda outs, k: policy.slice_outputs(outs, sizes[k])) if whole else None,
        )

    # -- feeds as a session pads them --

    def _samples(self, signature: dict[str, tuple[int, ...]]) -> list[_Sample]:
        policy = self.policy
        sig = tuple(signature[n] for n in policy.input_names)
        policy.restrict([sig])
        length = None
        if self.source.kind == "text" and "input_ids" in signature:
            shape = signature["input_ids"]
            length = shape[1] if len(shape) == 2 else None
        feeds = self.source.feeds(length)
        held = _held_out(len(feeds))
        batch = policy.batch_symbol()
        grouped = batch is not None and all(d[:1] == [batch] for d in policy.input_dims)
        rows: list[tuple[list[np.ndarray], dict[str, int], bool]] = []
        for i, feed in enumerate(feeds):
            arrays = [feed[n] for n in policy.input_names]
            parts = (
                [[a[j : j + 1] for a in arrays] for j in range(len(arrays[0]))]
                if grouped
                else [arrays]
            )
            for row in parts:
                try:
                    plan = policy.plan(row)
                except (NotWarmed, Oversize):
                    continue
                if plan is None:
                    continue
                for chunk in plan.chunks:
                    rows.append((*self._padded(row, plan, chunk, sig, grouped), i in held))
        if not rows:
            raise CalibrationError(
                f"no calibration feed ({self.source.describe()}) fits the input shapes "
                + ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in signature.items())
            )
        if not grouped:
            return [_Sample(a, s, h) for a, s, h in rows]
        assert batch is not None
        size = policy.size_of(sig, batch)
        samples = []
        for is_held in (False, True):
            mine = [r for r in rows if r[2] == is_held]
            for k in range(0, len(mine), size):
                group = mine[k : k + size]
                arrays = [np.concatenate(parts) for parts in zip(*(r[0] for r in group))]
                arrays = policy.pad(arrays, RunPlan(sig, (slice(None),), {}), slice(None))
                sizes = {s: max(r[1].get(s, 0) for r in group) for s in group[0][1]}
                sizes[batch] = len(group)
                samples.append(_Sample(arrays, sizes, is_held))
        return samples

    def _padded(
        self,
        row: list[np.ndarray],
        plan: RunPlan,
        chunk: slice,
        sig: tuple[tuple[int, ...], ...],
        grouped: bool,
    ) -> tuple[list[np.ndarray], dict[str, int]]:
        policy = self.policy
        sizes = policy.chunk_sizes(plan, chunk)
        if grouped:  # one row, padded to the signature but for its batch of one
            single = tuple((1, *shape[1:]) for shape in sig)
            plan = RunPlan(single, (slice(None),), plan.actual)
        return policy.pad(row, plan, chunk), sizes

    # -- the part's own tensors --

    def _run(
        self, signature: dict[str, tuple[int, ...]], part: Part, samples: Sequence[_Sample]
    ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
        """The part's inputs and onnxruntime's outputs of the part, for each sample."""
        from onnxruntime import SessionOptions
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

        spec = part.spec
        assert spec is not None
        files = self.planner.files(signature)
        graph = files.prepared.graph
        wanted = [n for n in dict.fromkeys([*part.inputs, *part.outputs]) if n not in self.names]
        probe = Segment(-1, "cpu", tuple(node_names(graph)), tuple(self.names), tuple(wanted))
        path = files.write(probe)
        try:
            quiet = SessionOptions()
            quiet.log_severity_level = 3  # the probe's unused initializers are not news
            session = InferenceSession(str(path), quiet, providers=["CPUExecutionProvider"])
            inputs, outputs = [], []
            for sample in samples:
                feed = dict(zip(self.policy.input_names, sample.arrays))
                got = dict(zip(wanted, session.run(wanted, feed)))
                got.update(feed)
                inputs.append(
                    [
                        np.ascontiguousarray(got[n], dtype=d)
                        for n, d in zip(spec.input_names, spec.input_dtypes)
                    ]
                )
                outputs.append([np.asarray(got[n]) for n in part.outputs])
        finally:
            for done in (path, path.with_name(f"{path.stem}.data")):
                try:
                    done.unlink()
                except OSError:
                    pass
        return inputs, outputs

    def _given_dataset(self, signature: dict[str, tuple[int, ...]], part: Part) -> PartSet:
        """A static model built whole from the toolkit's own dataset file, as given; measured on
        its first samples (in-sample: the file calibrates on all of them)."""
        assert self.planner.options.dataset is not None
        dataset = Path(self.planner.options.dataset)
        lines = [line for line in dataset.read_text().splitlines() if line.split()]
        try:
            feeds = self.source.feeds()[:MAX_HELD_OUT]
        except CalibrationError:
            return PartSet(dataset, len(lines), in_sample=True, source=self.source.describe())
        samples = [_Sample([f[n] for n in self.policy.input_names], {}, True) for f in feeds]
        inputs, outputs = self._run(signature, part, samples)
        return PartSet(dataset, len(lines), inputs, outputs, True, self.source.describe())


def _held_out(count: int) -> set[int]:
    """Which of ``count`` feeds are held out: about one in five, spread over the data."""
    if count < 2:
        return set()
    n = min(MAX_HELD_OUT, max(1, count // 5))
    step = count // n
    return {count - 1 - k * step for k in range(n)}


def _write_set(planner: Planner, samples: Sequence[Sequence[np.ndarray]]) -> Path:
    """The toolkit's dataset file for ``samples``, in the cache by content (a temporary folder
    of this process when the cache cannot be written)."""
    h = hashlib.sha256()
    for sample in samples:
        for a in sample:
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    digest = h.hexdigest()
    try:
        planner.cache._ensure_dirs("calibration", "calibration/sets")
        root = planner.cache.root / "calibration" / "sets"
    except OSError:
        root = owned_tempdir("rkort-calibration-")
    final = root / digest
    if (final / "dataset.txt").is_file():
        return final / "dataset.txt"
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=root))
    try:
        lines = []
        for k, sample in enumerate(samples):
            files = []
            for i, a in enumerate(sample):
                file = f"s{k:03d}-{i}.npy"
                fd = os.open(tmp / file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    np.save(f, a, allow_pickle=False)
                files.append(file)
            lines.append(" ".join(files))
        fd = os.open(tmp / "dataset.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process placed the same set first
            if not (final / "dataset.txt").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "dataset.txt"
