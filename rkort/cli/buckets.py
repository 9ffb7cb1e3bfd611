"""``rkort buckets``: the input shapes a model's sessions recorded (``record_shapes=1``), and the
K shapes that minimise padded compute on them, next to the buckets its sessions use now.

The fit itself is :mod:`rkort.fitting` (exact for one varying dim; for batch and sequence both
varying, exact within signature sets where each batch bucket has sequence buckets of its own).
Waste is counted as a session pads: every call goes to the cheapest shape that holds it (a batch
beyond the largest bucket in chunks), elements computed / elements of the call's own sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..buckets import NotWarmed, Oversize, ShapePolicy
from ..cache import Cache
from ..fitting import Fit, fits
from ..model import ModelSource
from ..options import RKNNOptions
from ..padding import make_policy
from ..traffic import Signature, read_traffic, traffic_dir
from .common import UsageError

DEFAULT_MAX_SHAPES = 12


class NoTraffic(Exception):
    """Nothing was recorded for this model in this cache."""


@dataclass
class TrafficFit:
    """What `rkort buckets` reports (and `rkort warmup --from-traffic` compiles)."""

    model: str
    directory: Path
    inputs: list[str]
    calls: int
    #: Calls the fit covers (the rest: ``left_out``, reason -> calls).
    samples: int
    left_out: dict[str, int]
    #: Dynamic symbol -> kind ("batch", "sequence"; "exact" when the model has such dims).
    kinds: dict[str, str]
    #: Symbol -> {size seen: calls}, over every call of this model's inputs.
    distribution: dict[str, dict[int, int]]
    signatures: list[Signature]
    buckets: dict[str, list[int]]
    waste: float
    current_buckets: dict[str, list[int]]
    current_shapes: int
    current_waste: float
    #: Calls the current buckets cannot hold (longer than their largest), left out of its waste.
    current_not_held: int
    exact: bool
    note: str
    #: Waste with at most 1, 2, ..., K shapes.
    curve: list[float] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "buckets": self.buckets,
            "signatures": [[list(s) for s in sig] for sig in self.signatures],
            "waste": round(self.waste, 4),
            "current_waste": round(self.current_waste, 4),
            "samples": self.samples,
            "calls": self.calls,
            "left_out": self.left_out,
            "current_buckets": self.current_buckets,
            "current_shapes": self.current_shapes,
            "current_not_held": self.current_not_held,
            "exact": self.exact,
            "note": self.note,
            "distribution": {
                s: {str(k): v for k, v in sorted(d.items())} for s, d in self.distribution.items()
            },
            "waste_by_shapes": [round(w, 4) for w in self.curve],
        }


def fit_traffic(model_path: str, options: RKNNOptions, cache: Cache, max_shapes: int) -> TrafficFit:
    """The recorded shapes of a model and the at most ``max_shapes`` signatures fitted to them.
    ``options`` give the current buckets (the session's defaults unless set)."""
    # onnxruntime's own class reads and checks the model: its errors are the ones sessions give.
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    if max_shapes < 1:
        raise UsageError("--max-shapes must be at least 1")
    sess = InferenceSession(model_path, providers=["CPUExecutionProvider"])
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    names = [i.name for i in inputs]
    source = ModelSource(model_path)
    model_hash = source.content_hash(cache)
    traffic = read_traffic(cache, model_hash)
    if traffic is None or not traffic.counts:
        raise NoTraffic(
            f"no shapes recorded for {model_path} in {cache.root}: run its sessions with the "
            "provider option record_shapes=1 (and the same cache_dir)"
        )
    current = make_policy(source, inputs, outputs, options)
    default = make_policy(source, inputs, outputs, RKNNOptions.parse({}))
    symbols = sorted(current.padded_symbols, key=lambda s: current.kind[s] != "batch")
    left_out: Counter[str] = Counter()
    sizes_of: dict[Signature, dict[str, int]] = {}
    for sig, n in traffic.counts.items():
        sizes = _sizes(current, sig) if traffic.inputs == names else None
        if sizes is None:
            left_out["shapes this model's inputs cannot take"] += n
        elif any(v == 0 for v in sizes.values()):
            left_out["an empty dim (onnxruntime answers)"] += n
        else:
            sizes_of[sig] = sizes
    if traffic.dropped:
        left_out["not kept (beyond the recording's bounds)"] += traffic.dropped
    shown = list(current.kind) if current.exact else symbols  # every dim that varies
    distribution = {s: dict(sorted(_marginal(traffic.counts, sizes_of, s).items())) for s in shown}
    base: dict[str, Any] = dict(
        model=model_path,
        directory=traffic_dir(cache, model_hash),
        inputs=names,
        calls=traffic.calls,
        kinds={s: current.kind[s] for s in shown},
        distribution=distribution,
        current_buckets={s: list(current.buckets[s]) for s in symbols},
        current_shapes=len(current.signatures()),
    )
    if current.static or current.exact:
        return _most_frequent(current, traffic.counts, sizes_of, left_out, max_shapes, base)
    limits = {
        s: max(default.buckets[s][-1], current.buckets[s][-1])
        for s in symbols
        if current.kind[s] == "sequence"
    }
    counts: Counter[tuple[int, ...]] = Counter()
    for sig, sizes in sizes_of.items():
        n = traffic.counts[sig]
        beyond = [s for s, limit in limits.items() if sizes[s] > limit]
        if beyond:
            s = beyond[0]
            left_out[f"{s} beyond the model's {limits[s]} (run on the CPU or refused)"] += n
        else:
            counts[tuple(sizes[s] for s in symbols)] += n
    if not counts:
        raise NoTraffic(f"none of the {traffic.calls} recorded calls of {model_path} can be fitted")
    curve = fits(counts, max_shapes)
    best: Fit = curve[-1]
    signatures = [_signature(current, dict(zip(symbols, shape))) for shape in best.shapes]
    held = [(sig, traffic.counts[sig]) for sig, sizes in sizes_of.items() if _within(sizes, limits)]
    fitted_policy = make_policy(source, inputs, outputs, options)
    fitted_policy.restrict(signatures)
    waste, _ = session_waste(fitted_policy, held)
    current_waste, not_held = session_waste(current, held)
    varying = [s for s in symbols if len(distribution[s]) > 1]
    return TrafficFit(
        **base,
        samples=sum(counts.values()),
        left_out=dict(left_out),
        signatures=signatures,
        buckets={s: sorted({shape[i] for shape in best.shapes}) for i, s in enumerate(symbols)},
        waste=waste,
        current_waste=current_waste,
        current_not_held=not_held,
        exact=best.exact,
        note=_note(best, varying),
        curve=[f.waste for f in curve],
    )


def session_waste(policy: ShapePolicy, calls: Iterable[tuple[Signature, int]]) -> tuple[float, int]:
    """(elements computed / needed, calls not held) for these calls padded as a session with
    ``policy`` pads them; calls it cannot hold are left out of the ratio."""
    computed = needed = not_held = 0
    for sig, n in calls:
        arrays = [np.broadcast_to(np.zeros((), np.int8), shape) for shape in sig]
        try:
            plan = policy.plan(arrays)
        except (Oversize, NotWarmed):
            plan = None
        if plan is None:
            not_held += n
            continue
        padded = [s for s in policy.padded_symbols if s in plan.actual]
        computed += (
            n * len(plan.chunks) * math.prod(policy.size_of(plan.signature, s) for s in padded)
        )
        needed += n * math.prod(plan.actual[s] for s in padded)
    return (computed / needed if needed else 1.0), not_held


def _sizes(policy: ShapePolicy, sig: Signature) -> dict[str, int] | None:
    """Each dynamic symbol's size in a recorded signature; None when it does not fit the model."""
    if len(sig) != len(policy.input_dims):
        return None
    sizes: dict[str, int] = {}
    for dims, shape in zip(policy.input_dims, sig):
        if len(dims) != len(shape):
            return None
        for d, n in zip(dims, shape):
            if isinstance(d, int):
                if d != n:
                    return None
            elif sizes.setdefault(d, n) != n:
                return None
    return sizes


def _within(sizes: Mapping[str, int], limits: Mapping[str, int]) -> bool:
    return all(sizes[s] <= limit for s, limit in limits.items())


def _signature(policy: ShapePolicy, sizes: Mapping[str, int]) -> Signature:
    return tuple(
        tuple(d if isinstance(d, int) else sizes[d] for d in dims) for dims in policy.input_dims
    )


def _marginal(
    counts: Mapping[Signature, int], sizes_of: Mapping[Signature, dict[str, int]], symbol: str
) -> Counter[int]:
    found: Counter[int] = Counter()
    for sig, sizes in sizes_of.items():
        found[sizes[symbol]] += counts[sig]
    return found


def _note(best: Fit, varying: Sequence[str]) -> str:
    if best.exact and best.cost == best.needed:
        return "exact optimum (every size recorded has a shape of its own: no padding)"
    if best.exact:
        which = f"one varying dim ({varying[0]})" if varying else "one size seen"
        return f"exact optimum ({which}: an optimal partition of the sizes seen)"
    return (
        f"{' and '.join(varying)} both vary: exact optimum among shape sets where each batch "
        "bucket has sequence buckets of its own (a call takes the smallest batch bucket that "
        "holds it, then its smallest sequence bucket); sessions take the cheapest shape that "
        "holds a call, which the waste shown counts, and a set without that restriction may "
        "waste less"
    )


def _most_frequent(
    policy: ShapePolicy,
    counts: Mapping[Signature, int],
    sizes_of: Mapping[Signature, dict[str, int]],
    left_out: Counter[str],
    max_shapes: int,
    base: dict[str, Any],
) -> TrafficFit:
    """A model with dims compiled per observed size (or none dynamic): nothing pads, so the
    fitted shapes are the most frequent ones recorded."""
    ranked = sorted(sizes_of, key=lambda s: (-counts[s], s))
    chosen = sorted(ranked[:max_shapes])
    held = sum(counts[s] for s in chosen)
    rest = sum(counts[s] for s in ranked[max_shapes:])
    if rest:
        left_out["other shapes (compiled per observed size, not padded)"] += rest
    exact = [s for s, k in policy.kind.items() if k == "exact"]
    note = (
        "static shapes: nothing to fit"
        if policy.static
        else f"dims {exact} are compiled per observed size, not padded: the {len(chosen)} most "
        f"frequent shapes recorded, holding {held} of {held + rest} calls"
    )
    return TrafficFit(
        **base,
        samples=held,
        left_out=dict(left_out),
        signatures=chosen,
        buckets={},
        waste=1.0,
        current_waste=1.0,
        current_not_held=0,
        exact=True,
        note=note,
        curve=[],
    )


def describe(fit: TrafficFit, max_shapes: int) -> str:
    """The text report."""
    lines = [
        f"{fit.model}: {fit.calls} call(s) recorded (input shapes only) in {fit.directory}",
    ]
    for symbol, dist in fit.distribution.items():
        total = sum(dist.values())
        lines.append(
            f"{symbol} ({fit.kinds[symbol]}), {len(dist)} size(s) seen in {total} call(s)"
            + (f": {_quantiles(dist)}" if dist else "")
        )
        lines += _wrap([f"{size}:{n}" for size, n in dist.items()], "  size:calls  ")
    for reason, n in fit.left_out.items():
        lines.append(f"left out of the fit: {n} call(s): {reason}")
    lines.append(f"fitted: {len(fit.signatures)} shape(s) (at most {max_shapes}); {fit.note}")
    for symbol, sizes in fit.buckets.items():
        lines.append(f"  {symbol}: {','.join(map(str, sizes))}")
    for sig in fit.signatures:
        lines.append(f"  {_named(fit.inputs, sig)}")
    if fit.buckets:
        current = " x ".join(f"{s} {','.join(map(str, b))}" for s, b in fit.current_buckets.items())
        held = f", {fit.current_not_held} call(s) beyond them" if fit.current_not_held else ""
        lines.append(
            f"padding waste (elements computed / needed) on the {fit.samples} call(s): current "
            f"buckets {fit.current_waste:.2f}x ({fit.current_shapes} shapes: {current}{held}), "
            f"fitted {fit.waste:.2f}x ({len(fit.signatures)} shapes)"
        )
        lines.append(
            "with at most K shapes: "
            + "  ".join(f"{k}: {w:.2f}x" for k, w in enumerate(fit.curve, 1))
        )
    lines.append(
        f"compile them for sessions of this model: rkort warmup {fit.model} --from-traffic "
        f"--max-shapes {max_shapes}"
    )
    return "\n".join(lines)


def _quantiles(dist: Mapping[int, int]) -> str:
    values = np.repeat(np.fromiter(dist.keys(), np.int64), np.fromiter(dist.values(), np.int64))
    return (
        f"min {values.min()}, median {int(np.median(values))}, "
        f"p90 {int(np.percentile(values, 90))}, max {values.max()}"
    )


def _wrap(words: Sequence[str], prefix: str, width: int = 100) -> list[str]:
    lines, line = [], prefix
    for w in words:
        if len(line) + len(w) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = " " * len(prefix)
        line += w + " "
    if line.strip():
        lines.append(line.rstrip())
    return lines


def _named(names: Sequence[str], sig: Signature) -> str:
    return ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in zip(names, sig))


def options_of(args: argparse.Namespace) -> RKNNOptions:
    raw = {}
    for key in ("buckets", "batch_buckets", "target"):
        if getattr(args, key, None):
            raw[key] = getattr(args, key)
    return RKNNOptions.parse(raw)


def cmd_buckets(args: argparse.Namespace) -> int:
    try:
        fit = fit_traffic(args.model, options_of(args), Cache(args.cache_dir), args.max_shapes)
    except NoTraffic as e:
        print(f"rkort buckets: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(fit.as_json(), indent=2))
    else:
        print(describe(fit, args.max_shapes))
    return 0


def add_buckets_parser(sub: Any) -> None:
    b = sub.add_parser(
        "buckets",
        help="the input shapes a model's sessions recorded (record_shapes=1) and the buckets "
        "fitted to them",
    )
    b.add_argument("model", help="an ONNX file")
    b.add_argument(
        "--max-shapes",
        type=int,
        default=DEFAULT_MAX_SHAPES,
        metavar="K",
        help=f"compiled shapes to fit (default {DEFAULT_MAX_SHAPES})",
    )
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument("--cache-dir", help="default: $RKORT_CACHE_DIR or the user cache dir")
    b.add_argument(
        "--buckets", help="the current sequence buckets to compare with (default: the session's)"
    )
    b.add_argument(
        "--batch-buckets",
        dest="batch_buckets",
        help="the current batch buckets to compare with (default: the session's, 1,2,4,8)",
    )
    b.set_defaults(func=cmd_buckets)
