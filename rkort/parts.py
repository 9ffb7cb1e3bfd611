"""Opening a program's NPU parts: built through the cache where a converter is at hand, loaded
from the cache where not (a board), each blob's entry recording what it was built from (a
quantized part by :mod:`rkort.quantbuild`'s ladder, with the figures it measured)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import backends
from .backends import Backend
from .backends.base import Opening, Runner
from .cache import Entry
from .calibsets import part_set
from .compiler import compile_blob
from .decision import Decision, Part
from .options import RKNNOptions
from .planner import Planner
from .platform import cores_of, toolkit_lite_version, toolkit_version
from .quantbuild import Opener, built_spec, trusted_build
from .spec import BuildSpec, build_recipe
from .stats import SessionStats

log = logging.getLogger("rkort")


class MissingBlob(Exception):
    """The cache has no blob for this part and nothing here can compile one."""


def runtime_version() -> str:
    """The RKNN toolchain version blobs are made for: the converter's, else the board runtime's."""
    return toolkit_version() or toolkit_lite_version() or "unknown"


def identity(spec: BuildSpec) -> dict[str, Any]:
    """What a cache entry must say it holds to be used for ``spec`` (on any machine)."""
    return {
        "target": spec.target,
        "inputs": {n: list(s) for n, s in zip(spec.input_names, spec.input_shapes)},
        "dtype": spec.quantized_dtype or spec.float_dtype,
    }


def blob_meta(
    planner: Planner, spec: BuildSpec, part: Part | None = None, signature: Any = None
) -> dict[str, Any]:
    """What a cache entry says about the blob it holds: what it is for, the toolkit that built
    it, and (given the part and its signature) the recipe a board rehearsal rebuilds it from."""
    meta: dict[str, Any] = {
        "model": str(planner.source.path),
        **identity(spec),
        "toolkit": runtime_version(),
    }
    if part is not None:
        source = planner.source
        meta["source"] = build_recipe(
            spec,
            kind=part.source,
            model=None if source.from_bytes else str(source.path.resolve()),
            model_sha256=planner.model_hash,
            signature=dict(signature or {}),
            segment={
                "nodes": list(part.nodes),
                "inputs": list(part.inputs),
                "outputs": list(part.outputs),
            }
            if part.source == "segment"
            else None,
            file_sha256=planner.cache.hashes.file_digest(spec.model_path),
        )
    return meta


def build_blob(
    planner: Planner,
    part: Part,
    signature: Any,
    dest: Path,
    progress: bool | None = None,
    open_runner: Opener | None = None,
) -> tuple[Runner | None, dict[str, Any]]:
    """Build the blob of an NPU part at ``dest``, and the metadata its cache entry adds.

    A float part is one compile. A quantized part goes up :mod:`rkort.quantbuild`'s ladder,
    measured with ``open_runner`` (default: the host simulator where there is one; the runner
    of the shipped build is returned open, else None)."""
    spec = part.spec
    assert spec is not None
    if not spec.quantized_dtype:
        if open_runner is not None:
            return open_runner(spec, dest), {}
        return None, compile_blob(spec, dest, progress=progress)
    if open_runner is None:
        simulator = backends.get("simulator")
        if simulator.available():
            open_runner = _opener(simulator, progress)
    runner, built, extra = trusted_build(
        planner,
        part,
        signature,
        dest,
        open_runner,
        lambda s, d: compile_blob(s, d, progress=progress),
    )
    extra["source"] = blob_meta(planner, built, part, signature)["source"]
    return runner, extra


def compile_to_cache(
    planner: Planner,
    decision: Decision,
    part: Part,
    progress: bool | None = None,
) -> tuple[Entry, bool]:
    """Make sure the blob of an NPU part is in the cache; True when this call compiled it."""
    assert part.spec is not None and part.key is not None
    planner.ensure_file(decision, part)

    def build(dest: Path) -> dict[str, Any]:
        runner, extra = build_blob(planner, part, decision.signature, dest, progress)
        if runner is not None:
            runner.close()
        return extra

    return planner.cache.get_or_build(
        part.key, build, blob_meta(planner, part.spec, part, decision.signature)
    )


def _opener(backend: Backend, progress: bool | None) -> Opener:
    return lambda spec, dest: backend.open(Opening(spec, export_to=dest, progress=progress))


class PartOpener:
    """Opens the NPU parts of one session's programs on its backend, counting what it compiles
    and loads in the session's stats."""

    def __init__(
        self, planner: Planner, backend: Backend, options: RKNNOptions, stats: SessionStats
    ) -> None:
        self.planner = planner
        self.cache = planner.cache
        self.backend = backend
        self.options = options
        self.stats = stats
        self.converter = toolkit_version() is not None

    @property
    def can_build(self) -> bool:
        """True when a part missing from the cache can be built here."""
        return self.backend.builds or self.converter

    def build(
        self, part: Part, signature: Mapping[str, Sequence[int]], core_mask: int | None = None
    ) -> Runner:
        """Build an NPU part through the cache (a trial build) and open it (on ``core_mask``)."""
        assert part.spec is not None and part.key is not None
        spec, progress = part.spec, self.options.progress
        meta = blob_meta(self.planner, spec, part, signature)
        if self.backend.builds:
            # The simulator runs only what it built in-process, so one build both fills the
            # cache (for boards and `rkort warmup`) and serves this session.
            built: list[Runner] = []

            def build(dest: Path) -> dict[str, Any]:
                runner, extra = build_blob(
                    self.planner, part, signature, dest, progress, _opener(self.backend, progress)
                )
                assert runner is not None
                built.append(runner)
                return extra

            entry, made = self.cache.get_or_build(part.key, build, meta)
            self._count(entry, made, spec)
            _discard_ephemeral(entry)
            if not built:
                shipped = self._as_built(entry, part, signature)
                built.append(self.backend.open(Opening(shipped, progress=progress)))
            runner = built[0]
            runner.memory = entry.size
            return runner

        def compile_only(dest: Path) -> dict[str, Any]:
            runner, extra = build_blob(self.planner, part, signature, dest, progress)
            if runner is not None:
                runner.close()
            return extra

        entry, made = self.cache.get_or_build(part.key, compile_only, meta)
        self._count(entry, made, spec)
        try:
            return self._load(spec, entry, core_mask)
        finally:
            _discard_ephemeral(entry)  # the runtime holds the blob once it is open

    def open(self, decision: Decision, part: Part, core_mask: int | None = None) -> Runner:
        """Open an NPU part no trial build opened (its decision came from the cache's record,
        or this is one more context of it): loaded from the cache, or built when it is missing
        and a converter is here."""
        assert part.spec is not None and part.key is not None
        if not self.backend.builds:
            entry = self.cache.get(part.key, identity(part.spec))
            if entry is not None:
                return self._load(part.spec, entry, core_mask)
            if not self.converter:
                raise MissingBlob(
                    f"the cache has no blob {part.key[:12]} for {part.spec.model_name}"
                )
        self.planner.ensure_file(decision, part)
        return self.build(part, decision.signature, core_mask)

    def _as_built(self, entry: Entry, part: Part, signature: Any) -> BuildSpec:
        """What the cached blob of a quantized part was built from (the ladder may have shipped
        a hybrid or float16 build), to build it again here; its calibration set is made again
        when it is gone."""
        assert part.spec is not None
        if not part.spec.quantized_dtype:
            return part.spec
        spec = built_spec(entry.meta, part.spec)
        if spec.quantized_dtype and not (spec.dataset and Path(spec.dataset).is_file()):
            spec = dataclasses.replace(
                spec, dataset=str(part_set(self.planner, signature, part).dataset)
            )
        return spec

    def _load(self, spec: BuildSpec, entry: Entry, core_mask: int | None) -> Runner:
        opening = Opening(spec, blob=entry.blob_path, options=self.options, core_mask=core_mask)
        runner = self.backend.open(opening)
        runner.memory = entry.size
        self.stats.loaded()
        return runner

    def core_masks(self) -> list[int | None]:
        """One core mask per context a part may open: one context per allowed core (the SoC's
        cores, restricted by the ``core_mask`` option), or one context on every allowed core with
        ``contexts=1``. On the host simulator a context is a worker process (at most one per
        CPU) and masks mean nothing."""
        cores = cores_of(self.options.target)
        mask = self.options.core_mask
        allowed = [c for c in range(cores) if mask in (0, 0xFFFF) or mask & (1 << c)] or [0]
        wanted = self.options.contexts or len(allowed)
        if self.backend.builds:
            return [None] * max(1, min(wanted, cores, os.cpu_count() or 1))
        if wanted == 1:
            return [None]  # the options' own mask: auto, or every allowed core at once
        return [1 << c for c in allowed[:wanted]]

    def _count(self, entry: Entry, made: bool, spec: BuildSpec) -> None:
        shapes = ", ".join(f"{n}={list(s)}" for n, s in zip(spec.input_names, spec.input_shapes))
        if made:
            self.stats.compiled()
            log.info(
                "compiled %s for %s (%s) into %s", spec.model_name, spec.target, shapes, entry.dir
            )
        else:
            log.info("using cached blob %s for %s (%s)", entry.key[:12], spec.model_name, shapes)


def _discard_ephemeral(entry: Entry) -> None:
    if entry.ephemeral:
        shutil.rmtree(entry.dir, ignore_errors=True)
