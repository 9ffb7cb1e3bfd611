"""Quantized builds users can trust: each NPU part calibrated on its own inputs for its own shape,
measured against onnxruntime on held-out samples, and replaced when it falls short.

The ladder, tried in order until a build's outputs are at least ``min_cosine`` (the worst cosine
of any output on any held-out sample) from onnxruntime's:

1. the quantized build as asked (``quant_algorithm``, ``quant_method``);
2. the toolkit's automatic hybrid quantization (``build(..., auto_hybrid=True)``);
3. rkort's layer-wise hybrid: the layers the toolkit's own accuracy analysis finds below a
   cosine of 0.999 stay in float16 (:mod:`rkort.toolkit.hybrid`);
4. the same, stricter: more layers in float16 (below 0.9995, then 0.9999);
5. float16.

A step below the goal is said in a warning with the measured figures, and every figure goes into
the blob's cache entry (``meta.json``: ``quantization``), with the recipe of what was shipped.
Measuring needs a runner that executes a build (the host simulator, or a board over adb): each
held-out sample is one run. Where none is at hand the blob is shipped unmeasured, and said so.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from .accuracy import Figures
from .backends import Runner, RunnerError
from .calibsets import PartSet, part_set
from .decision import Part
from .planner import Planner
from .spec import BuildSpec, CompileError

log = logging.getLogger("rkort")

#: ``open(spec, export_to)``: build ``spec`` (exporting the blob there) and run it.
Opener = Callable[[BuildSpec, Optional[Path]], Runner]

#: The ladder's steps: (name, what the spec becomes).
_STEPS: tuple[tuple[str, Callable[[BuildSpec], BuildSpec]], ...] = (
    ("quantized", lambda s: s),
    ("auto hybrid", lambda s: dataclasses.replace(s, hybrid="auto")),
    ("layer hybrid", lambda s: dataclasses.replace(s, hybrid="layers")),
    ("layer hybrid, strict", lambda s: dataclasses.replace(s, hybrid="layers-strict")),
    ("fp16", lambda s: float_spec(s)),
)


def float_spec(spec: BuildSpec) -> BuildSpec:
    """The float16 build of a quantized spec."""
    return dataclasses.replace(
        spec,
        quantized_dtype=None,
        dataset=None,
        calibration=None,
        min_cosine=None,
        hybrid=None,
        float_layers=(),
    )


def label(spec: BuildSpec) -> str:
    """What a spec builds, in the user's words: ``w8a8``, ``w8a8 + auto hybrid``,
    ``w8a8 + 44 float16 layers``, ``fp16``."""
    if not spec.quantized_dtype:
        return "fp16"
    if spec.hybrid == "auto":
        return f"{spec.quantized_dtype} + auto hybrid"
    if spec.hybrid in ("layers", "layers-strict"):
        return f"{spec.quantized_dtype} + {len(spec.float_layers)} float16 layers"
    return spec.quantized_dtype


def trusted_build(
    planner: Planner,
    part: Part,
    signature: Mapping[str, Sequence[int]],
    dest: Path,
    open_runner: Opener | None,
    compile_only: Callable[[BuildSpec, Path], Any],
) -> tuple[Runner | None, BuildSpec, dict[str, Any]]:
    """Build a quantized NPU part into ``dest`` by the ladder; returns the open runner of the
    shipped build (None without ``open_runner``: built with ``compile_only`` and unmeasured),
    the spec that was built, and the figures for the cache entry."""
    spec = part.spec
    assert spec is not None and spec.quantized_dtype
    calibration = part_set(planner, signature, part)
    asked = dataclasses.replace(spec, dataset=str(calibration.dataset))
    goal = spec.min_cosine if spec.min_cosine is not None else 0.0
    where = _where(planner, spec)
    if open_runner is None or not calibration.held_inputs:
        compile_only(asked, dest)
        log.warning(
            "%s: the %s build is not measured against onnxruntime (%s); it is shipped as built",
            where,
            asked.quantized_dtype,
            "no runner here executes a build" if open_runner is None else "no sample to measure",
        )
        return None, asked, {"quantization": _meta(spec, asked, calibration, [], None)}
    attempts: list[dict[str, Any]] = []
    first_error: CompileError | None = None
    for step, (name, make) in enumerate(_STEPS):
        candidate = make(asked)
        started = time.monotonic()
        try:
            runner = open_runner(candidate, dest)
        except CompileError as e:
            if step in (0, len(_STEPS) - 1):
                raise
            first_error = first_error or e
            attempts.append({"build": name, "error": str(e)[:500]})
            continue
        layers = getattr(runner, "build_info", {}).get("float_layers")
        if candidate.hybrid in ("layers", "layers-strict") and layers is not None:
            candidate = dataclasses.replace(candidate, float_layers=tuple(layers))
        try:
            figures = calibration.measure(part.outputs, runner.run)
        except RunnerError as e:
            runner.close()
            if step == len(_STEPS) - 1:
                raise CompileError(f"{where}: the fp16 build cannot run: {e}") from e
            attempts.append({"build": label(candidate), "error": str(e)[:500]})
            continue
        attempts.append(
            {
                "build": label(candidate),
                **figures.to_json(),
                "seconds": round(time.monotonic() - started, 2),
            }
        )
        if figures.passes(goal) or step == len(_STEPS) - 1:
            _say(where, spec, candidate, attempts, figures, goal)
            return (
                runner,
                candidate,
                {"quantization": _meta(spec, candidate, calibration, attempts, figures)},
            )
        runner.close()
    raise AssertionError("the ladder ends with fp16")  # pragma: no cover


def built_spec(meta: Mapping[str, Any], spec: BuildSpec) -> BuildSpec:
    """The spec a cache entry says its blob was built from (its recipe), for the file
    ``spec.model_path`` here; ``spec`` itself when the entry records none."""
    source = meta.get("source")
    if not isinstance(source, Mapping) or not isinstance(source.get("spec"), Mapping):
        return spec
    data = source["spec"]
    config = ("target", "float_dtype", "quantized_dtype", "dataset", "optimization_level")
    try:
        return BuildSpec.from_json(data, spec.model_path, **{k: data[k] for k in config})
    except (KeyError, TypeError, ValueError):
        return spec


def _meta(
    asked: BuildSpec,
    built: BuildSpec,
    calibration: PartSet,
    attempts: list[dict[str, Any]],
    figures: Figures | None,
) -> dict[str, Any]:
    return {
        "requested": asked.quantized_dtype,
        "quant_algorithm": asked.quant_algorithm,
        "quant_method": asked.quant_method,
        "min_cosine": asked.min_cosine,
        "built": label(built),
        "float_layers": len(built.float_layers),
        "calibration": calibration.to_json(),
        "measured": figures is not None,
        "cosine_min": round(figures.cosine_min, 6) if figures else None,
        "cosine_mean": round(figures.cosine_mean, 6) if figures else None,
        "figures": figures.to_json() if figures else None,
        "attempts": attempts,
    }


def _where(planner: Planner, spec: BuildSpec) -> str:
    shapes = ", ".join(
        f"{n}={'x'.join(map(str, s))}" for n, s in zip(spec.input_names, spec.input_shapes)
    )
    return f"{planner.source.path.name} ({shapes}, {spec.target})"


def _say(
    where: str,
    asked: BuildSpec,
    built: BuildSpec,
    attempts: list[dict[str, Any]],
    figures: Figures,
    goal: float,
) -> None:
    if len(attempts) == 1:
        log.info(
            "%s: the %s build is at %s from onnxruntime", where, label(built), figures.summary()
        )
        return
    steps = "; ".join(
        f"{a['build']}: "
        + (
            f"cosine {a['cosine_min']:.4f} min / {a['cosine_mean']:.4f} mean"
            if "cosine_min" in a
            else f"failed ({a['error'][:120]})"
        )
        for a in attempts
    )
    verdict = "meets it" if figures.passes(goal) else "the closest there is"
    log.warning(
        "%s: the %s build is below min_cosine %s against onnxruntime (%s); shipping %s, which "
        "%s: %s",
        where,
        asked.quantized_dtype,
        goal,
        steps,
        label(built),
        verdict,
        figures.summary(),
    )
