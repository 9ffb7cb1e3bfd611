"""Control flow as programs: the run side. A model whose top-level Ifs have cheap run-time
conditions (:mod:`rkort.branches`) runs each call as its condition model on the CPU, then the
branch model those conditions choose, each branch model with an engine of its own (NPU segments
where they pay, compiled and cached by its own content, per shape).

:func:`open_engine` is how a session gets its engine: this one, or a plain
:class:`~rkort.engine.RKNNEngine` for a model without such Ifs (known from the cache without
parsing the model, once it has been looked at).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .branches import Branching, branch_model, branching, condition_model
from .cache import Cache, make_key, session_cache
from .engine import CpuCall, RKNNEngine
from .errors import Unsupported
from .files import owned_tempdir, write_atomic
from .front import EngineFront
from .masked import MaskedEngine, model_mask
from .model import ModelSource
from .options import RKNNOptions
from .stats import SessionStats

log = logging.getLogger("rkort")

BRANCHING_FORMAT = 1
Choice = tuple[bool, ...]


def open_engine(
    model: ModelSource,
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    options: RKNNOptions,
    stats: SessionStats | None = None,
    cpu_options: Any = None,
) -> RKNNEngine | BranchEngine | MaskedEngine:
    """The engine for a session of ``model``: one per branch of its runtime Ifs, one on its copy
    with a mask over the past (a decoder exported without one), or one."""
    cache = session_cache(options)
    split = model_branching(model, cache)
    if split.ifs:
        return BranchEngine(model, split, inputs, outputs, options, stats, cpu_options, cache)
    mask = model_mask(model, cache)
    if mask is not None:
        return MaskedEngine(model, mask, inputs, outputs, options, stats, cpu_options, cache)
    return RKNNEngine(model, inputs, outputs, options, stats, cpu_options, cache)


def model_branching(model: ModelSource, cache: Cache) -> Branching:
    """How ``model`` splits (kept in the cache: a warm open does not parse the model)."""
    model_hash = model.content_hash(cache)
    body = cache.records.get(model_hash, _record_key(model_hash))
    if body is not None:
        try:
            return Branching(tuple(body["ifs"]), tuple(body["conditions"]), tuple(body["reasons"]))
        except (KeyError, TypeError):
            pass
    split = branching(model.proto)
    _record(cache, model_hash, split, {})
    return split


def _record_key(model_hash: str) -> str:
    return make_key(
        {"kind": "branching", "branching_format": BRANCHING_FORMAT, "model": model_hash}
    )


def _record(cache: Cache, model_hash: str, split: Branching, files: dict[str, str]) -> None:
    cache.records.put(
        model_hash,
        _record_key(model_hash),
        {
            "ifs": list(split.ifs),
            "conditions": list(split.conditions),
            "reasons": list(split.reasons),
            "files": files,
        },
    )


def branch_files(model: ModelSource, split: Branching, cache: Cache) -> dict[str, Path]:
    """The condition model (key "conditions") and one model per branch (key: its label, "T",
    "F", "TF", ...), as files in the cache (made once, named by their content, so a board
    rehearsal finds what its blobs were built from), or in a private temporary directory when
    the cache cannot be written."""
    model_hash = model.content_hash(cache)
    body = cache.records.get(model_hash, _record_key(model_hash)) or {}
    try:
        directory = cache.model_dir("branches", model_hash)
    except OSError as e:
        log.debug("branch models of %s go to a temporary directory: %s", model.path.name, e)
        directory = owned_tempdir("rkort-branches-")
        weakref.finalize(model, shutil.rmtree, str(directory), True)
        body = {}
    recorded = body.get("files")
    known: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    found = {k: directory / v for k, v in known.items() if isinstance(v, str) and "/" not in v}
    if found and len(found) == 2 ** len(split.ifs) + 1 and all(p.is_file() for p in found.values()):
        return found
    proto = model.proto
    made = {"conditions": condition_model(proto, split)}
    for k in range(2 ** len(split.ifs)):
        choice = tuple(bool(k >> (len(split.ifs) - 1 - j) & 1) for j in range(len(split.ifs)))
        made[_label(choice)] = branch_model(proto, split, choice)
    if not model.from_bytes:
        for f in model.external_files:  # the branch models read the model's external weights
            link = directory / f.relative_to(model.path.parent)
            if not link.exists():
                link.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.symlink(f.resolve(), link)
    names = {}
    for label, branch in made.items():
        data = branch.SerializeToString()
        name = f"{model.path.stem}-{label}-{hashlib.sha256(data).hexdigest()[:16]}.onnx"
        if not (directory / name).is_file():
            write_atomic(directory / name, data)
        names[label] = name
    _record(cache, model_hash, split, names)
    return {k: directory / v for k, v in names.items()}


class BranchEngine(EngineFront):
    """Runs a model with runtime Ifs: the conditions on the CPU, then the chosen branch model's
    engine. A branch that cannot run on RKNN sends its calls to the CPU (:class:`CpuCall`)."""

    npu_only = False

    def __init__(
        self,
        model: ModelSource,
        split: Branching,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        options: RKNNOptions,
        stats: SessionStats | None = None,
        cpu_options: Any = None,
        cache: Cache | None = None,
    ) -> None:
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

        super().__init__(model, inputs, outputs, options, cache)
        self.stats = stats if stats is not None else SessionStats(model.path.name)
        self.split = split
        self._name = model.path.name
        files = branch_files(model, split, self.cache)
        self._conditions = InferenceSession(
            str(files.pop("conditions")), cpu_options, providers=["CPUExecutionProvider"]
        )
        self._condition_inputs = [
            (i.name, self.input_names.index(i.name)) for i in self._conditions.get_inputs()
        ]
        self._engines: dict[Choice, tuple[RKNNEngine | MaskedEngine, list[int]]] = {}
        self._failed: dict[Choice, str] = {}
        self._lock = threading.Lock()
        # Branch models do not record traffic or feeds: those belong to the model the user has.
        branch_options = dataclasses.replace(options, record_shapes=False, record_inputs=0)
        by_name = {i.name: i for i in inputs}
        try:
            for label, path in files.items():
                choice = tuple(c == "T" for c in label)
                source = ModelSource(path)
                names = [n for n in model_inputs(path) if n in by_name]
                args = ([by_name[n] for n in names], outputs, branch_options, self.stats)
                try:
                    # A merged decoder's branch with a past is a decoder with a past.
                    mask = model_mask(source, self.cache)
                    engine = (
                        RKNNEngine(source, *args, cpu_options, self.cache)
                        if mask is None
                        else MaskedEngine(source, mask, *args, cpu_options, self.cache)
                    )
                except Unsupported as e:
                    self._failed[choice] = f"branch {label} of {self._name}: {e}"
                    log.info("%s", self._failed[choice])
                    continue
                self._engines[choice] = (engine, [self.input_names.index(n) for n in names])
        except BaseException:
            self.close()
            raise
        if not self._engines:
            raise Unsupported("; ".join(self._failed.values()))
        model.drop_graph()

    def run(
        self,
        arrays: Sequence[np.ndarray],
        profile: dict[str, Any] | None = None,
        on_segment: Any = None,
        stop: Callable[[], None] | None = None,
    ) -> list[np.ndarray]:
        """Outputs in model order (see :meth:`RKNNEngine.run`)."""
        feed = {name: arrays[i] for name, i in self._condition_inputs}
        values = [np.asarray(v) for v in self._conditions.run(None, feed)]
        if any(v.size != 1 for v in values):
            raise CpuCall("an If condition that is not a single value")
        choice = tuple(bool(v.reshape(())) for v in values)
        found = self._engines.get(choice)
        if found is None:
            raise CpuCall(self._failed.get(choice, f"branch {_label(choice)} is not open"))
        engine, picks = found
        if profile is not None:
            profile["branch"] = _label(choice)
        return engine.run([arrays[i] for i in picks], profile, on_segment, stop)

    def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine, _ in engines:
            engine.close()


def model_inputs(path: Path) -> list[str]:
    """The inputs of a branch model (read without loading its weights)."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in weights]


def _label(choice: Choice) -> str:
    return "".join("T" if c else "F" for c in choice)
