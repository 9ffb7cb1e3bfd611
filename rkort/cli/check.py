"""``rkort check``: how close a quantized build of a model is to onnxruntime, before it ships.

For every shape the model's sessions compile (or each ``--shape``), each NPU part is calibrated
as a session calibrates it (:mod:`rkort.calibsets`), built as asked (no fallback) on the host
simulator, and run on the held-out samples: the cosine of each output to onnxruntime's, and for
a classifier whether the labels agree. With ``--layers``, the toolkit's accuracy analysis adds
each layer's cosine to its float model (with the errors before it, and alone): the layers to
keep in float16 stand out. Its large dumps go to the toolkit worker's private temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import Opening, get
from ..cache import Cache
from ..calibsets import part_set
from ..engine import make_policy
from ..model import ModelSource
from ..planner import Part, Planner
from ..shapes import signature_of
from ..spec import CompileError
from ..toolkit.process import WorkerProcess
from ..toolkit.protocol import LAYER_SELECTION, build_request
from .common import UsageError, parse_shape
from .warmup import add_calibration_flags, parse_options

_FLAGS = (
    "target",
    "dataset",
    "calibration",
    "calibration_text",
    "tokenizer",
    "quant_algorithm",
    "quant_method",
    "buckets",
    "batch_buckets",
    "cpu_ops",
    "cache_dir",
)


def add_check_parser(sub: Any) -> None:
    c = sub.add_parser(
        "check",
        help="measure a quantized build of a model against onnxruntime (per output, per layer)",
    )
    c.add_argument("model", help="an ONNX file")
    c.add_argument("--dtype", default="w8a8", help="w8a8 (default), w8a16, w16a16i_dfp, w4a16")
    c.add_argument("--target", help="default: this board's SoC, rk3588 on a host")
    c.add_argument("--dataset", help="the toolkit's calibration dataset file")
    add_calibration_flags(c)
    c.add_argument("--buckets", help="sequence buckets to check, e.g. 32,64 (default: all)")
    c.add_argument("--batch-buckets", dest="batch_buckets", help="batch buckets, e.g. 1")
    c.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        metavar="NAME=DIMxDIM",
        help="check this static shape only (repeatable, one per dynamic input)",
    )
    c.add_argument("--cpu-ops", dest="cpu_ops", help="op types to keep on the CPU")
    c.add_argument("--layers", action="store_true", help="also each layer's cosine (slow)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--cache-dir", help="default: $RKORT_CACHE_DIR or the user cache dir")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    raw = {"dtype": args.dtype, "min_cosine": "0"}
    for key in _FLAGS:
        if getattr(args, key, None):
            raw[key] = getattr(args, key)
    options = parse_options(raw)
    if not options.quantized_dtype:
        raise UsageError("check measures a quantized build: give --dtype w8a8 (or another)")
    simulator = get("simulator")
    if not simulator.available():
        raise UsageError("check builds on the host simulator: rknn-toolkit2 is needed")
    sess = InferenceSession(args.model, providers=["CPUExecutionProvider"])
    model = ModelSource(args.model)
    planner = Planner(model, options, Cache(args.cache_dir))
    try:
        if args.shape:
            signatures = [signature_of(model.proto, dict(args.shape))]
        else:
            policy = make_policy(model, sess.get_inputs(), sess.get_outputs(), options)
            names = [i.name for i in sess.get_inputs()]
            signatures = [dict(zip(names, s)) for s in policy.signatures()]
            if not signatures:
                raise UsageError("some dims are compiled per observed size: give --shape")
        progress = False if args.quiet or args.json else None
        report = []
        for sig in signatures:
            checked: dict[str, dict[str, Any]] = {}

            def build(
                part: Part,
                sig: Mapping[str, Sequence[int]] = sig,
                checked: dict[str, dict[str, Any]] = checked,
            ) -> None:
                checked[part.key or ""] = _check_part(planner, part, sig, args.layers, progress)

            try:
                decision, _ = planner.decide(sig, build=build)
            except CompileError as e:
                print(f"rkort check: could not build {args.model}: {e}")
                return 1
            for part in decision.npu_parts:
                found = checked.get(part.key or "")
                if found is None:  # the decision was recorded: nothing was built for it
                    planner.ensure_file(decision, part)
                    found = _check_part(planner, part, decision.signature, args.layers, progress)
                report.append(found)
                if not args.json:
                    _print(found, len(decision.npu_parts) > 1)
        if args.json:
            print(json.dumps(report, indent=2))
        return 0
    finally:
        planner.close()


def _check_part(
    planner: Planner,
    part: Part,
    signature: Mapping[str, Sequence[int]],
    layers: bool,
    progress: bool | None,
) -> dict[str, Any]:
    assert part.spec is not None
    calibration = part_set(planner, signature, part)
    spec = dataclasses.replace(part.spec, dataset=str(calibration.dataset))
    runner = get("simulator").open(Opening(spec, progress=progress))
    try:
        figures = calibration.measure(part.outputs, runner.run)
    finally:
        runner.close()
    found: dict[str, Any] = {
        "part": part.index,
        "source": part.source,
        "inputs": {n: list(s) for n, s in zip(spec.input_names, spec.input_shapes)},
        "dtype": spec.quantized_dtype,
        "quant_algorithm": spec.quant_algorithm,
        "quant_method": spec.quant_method,
        "calibration": calibration.to_json(),
        **figures.to_json(),
    }
    if layers:
        found["layers"] = _layers(spec, calibration.held_inputs[0], progress)
    return found


def _layers(spec: Any, sample: Sequence[np.ndarray], progress: bool | None) -> list[dict[str, Any]]:
    """The toolkit's per-layer accuracy analysis of ``spec`` on one sample."""
    with tempfile.TemporaryDirectory(prefix="rkort-check-") as tmp:
        paths = []
        for i, a in enumerate(sample):
            path = Path(tmp) / f"input-{i}.npy"
            np.save(path, a)
            paths.append(str(path))
        worker = WorkerProcess(
            "compile",
            build_request(spec, export=False, analyse=[paths]),
            subject=f"{spec.model_name} for {spec.target} (accuracy analysis)",
            progress=progress,
        )
        try:
            info = worker.wait_until("done")
        finally:
            worker.close()
    return list(info.get("layers") or [])


def _print(found: Mapping[str, Any], several: bool) -> None:
    shapes = ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in found["inputs"].items())
    what = f"part {found['part']} ({found['source']}) " if several else ""
    cal = found["calibration"]
    held = (
        f"measured on {cal['samples']} calibration samples (none held out)"
        if cal["in_sample"]
        else f"{cal['held_out']} held-out samples"
    )
    print(
        f"{what}{shapes}: {found['dtype']} ({found['quant_algorithm']}, {found['quant_method']}), "
        f"{cal['samples']} calibration samples from {cal['source']}, {held}"
    )
    for out in found["outputs"]:
        labels = "" if out["labels"] is None else f"   labels {100 * out['labels']:.1f} % agree"
        print(
            f"  {out['name']:<40} cosine {out['cosine_min']:.4f} min / {out['cosine_mean']:.4f} "
            f"mean{labels}"
        )
    rows = found.get("layers")
    if rows:
        print(
            f"  layers (cosine to the float model; * alone below {_THRESHOLD}: "
            "a candidate for float16):"
        )
        for row in rows:
            mark = "*" if row["single"] is not None and row["single"] < _THRESHOLD else " "
            print(
                f"  {mark} {row['op']:<16} {row['layer']:<70} entire {_num(row['entire'])}  "
                f"alone {_num(row['single'])}"
            )


#: Where the layer-wise hybrid starts keeping layers in float16.
_THRESHOLD = LAYER_SELECTION["layers"][0][0]


def _num(value: float | None) -> str:
    return "   -   " if value is None else f"{value:.5f}"
