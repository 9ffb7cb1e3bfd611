"""``shape_mode=dynamic``: one blob holding every bucket signature (the toolkit's
``dynamic_input``), one context serving the programs of all of them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Runner
from .decision import Part
from .parts import PartOpener
from .planner import Planner
from .program import Program

log = logging.getLogger("rkort")


def multi_shape_part(
    planner: Planner, signatures: Sequence[Mapping[str, Sequence[int]]]
) -> Part | None:
    """One NPU part holding every signature (``shape_mode=dynamic``: the toolkit's
    ``dynamic_input``), or None when the placement keeps part of the model off the NPU for some
    signature (then one blob per bucket runs the same placement instead)."""
    decisions = [planner.decide(sig)[0] for sig in signatures]
    if not all(len(d.parts) == 1 and d.parts[0].source != "segment" for d in decisions):
        log.info(
            "shape_mode=dynamic: part of %s runs on the CPU, so each bucket gets a blob of its own",
            planner.source.path.name,
        )
        return None
    last = decisions[-1].parts[0]
    assert last.spec is not None
    shapes = tuple(d.parts[0].spec.input_shapes for d in decisions)  # type: ignore[union-attr]
    spec = replace(last.spec, dynamic_input=shapes)
    return replace(last, spec=spec, key=planner.blob_key(spec, last.source, last.nodes))


def open_multi_shape(
    planner: Planner, parts: PartOpener, signatures: Sequence[Mapping[str, Sequence[int]]]
) -> list[Program]:
    """One program per signature, all on one multi-shape blob; [] when the placement keeps part
    of the model off the NPU for some signature (each bucket then gets a blob of its own)."""
    part = multi_shape_part(planner, signatures)
    if part is None:
        return []
    decision = planner.decide(signatures[-1])[0]
    runner = _Shared(parts.open(decision, part))
    programs = []
    for sig in signatures:
        one = planner.decide(sig)[0]
        shaped = _Shaped(runner, one.parts[0].spec.output_shapes)  # type: ignore[union-attr]
        programs.append(Program(one, _Always(shaped), _no_cpu))
    return programs


class _Shared(Runner):
    """One multi-shape blob's runner shared by every signature; closed once, by the engine."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner.spec)
        self.name = inner.name
        self._inner = inner

    def run(
        self, inputs: Sequence[np.ndarray], output_shapes: Sequence[tuple[int, ...]] | None = None
    ) -> list[np.ndarray]:
        return self._inner.run(inputs, output_shapes)

    def _run(self, inputs: list[np.ndarray]) -> Sequence[Any]:
        raise NotImplementedError

    def _release(self) -> None:
        self._inner.close()


class _Shaped(Runner):
    """The shared multi-shape runner seen by one signature: its outputs take that signature's
    shapes; closing it leaves the shared runner open."""

    def __init__(self, shared: _Shared, output_shapes: tuple[tuple[int, ...], ...]) -> None:
        super().__init__(shared.spec)
        self.name = shared.name
        self._shared = shared
        self._shapes = output_shapes

    def run(
        self, inputs: Sequence[np.ndarray], output_shapes: Sequence[tuple[int, ...]] | None = None
    ) -> list[np.ndarray]:
        return self._shared.run(inputs, output_shapes or self._shapes)

    def _run(self, inputs: list[np.ndarray]) -> Sequence[Any]:
        raise NotImplementedError

    def _release(self) -> None:
        pass


class _Always:
    """An ``open_npu`` that gives every part the same runner."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def __call__(self, part: Part) -> Runner:
        return self.runner


def _no_cpu(part: Part) -> tuple[Any, Path]:
    raise AssertionError("a multi-shape program has no CPU part")
