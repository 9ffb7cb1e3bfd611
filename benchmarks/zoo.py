"""The zoo: real models that packages on the index ship (compat/zoo/), each fed exactly what its
unchanged app feeds it, on onnxruntime and on rkort's RKNN provider (rk3588 on the simulator)
side by side: the share of FLOPs planned for the NPU, segments, calls the NPU answered, compiles,
per-call time ratio, and the cosine of every output against onnxruntime.

    .venv/bin/python benchmarks/zoo.py [--only magika nudenet ...] [--seconds 4]

Packages that are not installed are listed and skipped. Sessions are not strict (as a user's):
a model rkort cannot put on the NPU runs on the CPU and the table says why. Rows marked
"workaround" run a copy of the model whose input shapes are written into the graph, to show what
the model gives on the NPU while the defect that keeps it off stays open.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c
import numpy as np

if str(c.ROOT) not in sys.path:
    sys.path.insert(0, str(c.ROOT))

RKNN = "RKNNExecutionProvider"
CPU = "CPUExecutionProvider"
#: At most this many recorded feeds are compared per model (silero-vad makes 250 calls).
MAX_COMPARED = 64


def static_copy(path: Path, shapes: dict[str, tuple[int, ...]], directory: Path) -> Path:
    """A copy of the model whose inputs declare these static shapes (the workaround rows)."""
    import onnx

    model = onnx.load(str(path))
    for value in model.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for d, size in zip(dims, shapes[value.name]):
                d.ClearField("dim_param")
                d.dim_value = size
    out = directory / f"static-{path.name}"
    onnx.save(model, str(out))
    return out


def plan(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """What `rkort inspect --shape ...` reports, or the error it raises."""
    from rkort.cli.inspect import build_report

    try:
        return build_report(str(path), c.TARGET, [], shapes)
    except Exception as e:  # noqa: BLE001 - the table shows it
        return {"error": f"{type(e).__name__}: {e}"}


def output_cosines(
    reference: Any, session: Any, feeds: list[dict[str, Any]]
) -> tuple[dict[str, float], float]:
    """The lowest cosine of each output over the feeds, and the largest absolute difference."""
    names = [o.name for o in reference.get_outputs()]
    lowest = {n: 1.0 for n in names}
    worst = 0.0
    for feed in feeds:
        want = reference.run(None, feed)
        got = session.run(None, feed)
        for n, a, b in zip(names, want, got):
            lowest[n] = min(lowest[n], c.cosine(a, b))
            worst = max(worst, float(np.max(np.abs(np.asarray(a, np.float64) - b))))
    return lowest, worst


def measure(
    label: str, path: Path, feeds: list[dict[str, Any]], cache: Path, seconds: float
) -> dict[str, Any]:
    import onnxruntime

    import rkort

    shapes = {k: tuple(np.shape(v)) for k, v in feeds[0].items()}
    planned = plan(path, shapes)
    with c.Clock() as t_ort:
        reference = onnxruntime.InferenceSession(str(path), providers=[CPU])
    providers = [(RKNN, {"cache_dir": str(cache)}), CPU]
    with c.Clock() as t_rk:
        session = rkort.InferenceSession(str(path), providers=providers)
        session.run(None, feeds[0])  # the first answer: compiles happen at open or here
    with c.Clock() as first:
        reference.run(None, feeds[0])
    compared = feeds if len(feeds) <= MAX_COMPARED else feeds[:: len(feeds) // MAX_COMPARED]
    cosines, worst = output_cosines(reference, session, compared)
    stats = rkort.session_stats(session)
    feed = feeds[len(feeds) // 2]
    with c.Clock() as one:
        session.run(None, feed)
    calls = int(max(4, min(200, seconds / max(one.s, 1e-4))))
    times = c.interleave(
        {
            "onnxruntime": lambda: reference.run(None, feed),
            "rkort": lambda: session.run(None, feed),
        },
        calls=calls,
        warmup=1,
        rounds=min(c.ROUNDS, calls),
    )
    return {
        "label": label,
        "shapes": shapes,
        "plan": planned,
        "providers": session.get_providers(),
        "stats": stats,
        "cosines": cosines,
        "max_abs": worst,
        "compared": len(compared),
        "open": {"onnxruntime": t_ort.s + first.s, "rkort": t_rk.s},
        "time": {k: c.Stats.of(v) for k, v in times.items()},
    }


def _dims(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in shapes.items())


def _share(r: dict[str, Any]) -> str:
    p = r["plan"]
    if "error" in p:
        return "n/a (inspect: " + p["error"][:60] + ")"
    return f"{100 * p['npu_flop_share']:.1f} % of {p['flops']['total'] / 1e9:.3g} GFLOP"


def _segments(r: dict[str, Any]) -> str:
    if "error" in r["plan"]:
        return "n/a"
    segs = r["plan"]["segments"]
    npu = sum(1 for s in segs if s["device"] == "npu")
    return f"{len(segs)} ({npu} NPU, {len(segs) - npu} CPU)"


def rows(results: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    table, notes = [], []
    for r in results:
        s = r["stats"]
        ort_t, rk_t = r["time"]["onnxruntime"].median, r["time"]["rkort"].median
        cos = min(r["cosines"].values())
        table.append(
            [
                r["label"],
                _dims(r["shapes"]),
                _share(r),
                _segments(r),
                f"{s['npu_calls']} / {s['npu_calls'] + s['cpu_calls']}",
                str(s["compiles"]),
                f"{c.secs(r['open']['rkort'])} / {c.secs(r['open']['onnxruntime'])}",
                c.ms(ort_t),
                c.ms(rk_t),
                c.ratio(rk_t, ort_t),
                f"{cos:.6f}" + ("" if cos >= 0.999 else " (< 0.999)"),
                f"{r['max_abs']:.3g}",
            ]
        )
        for reason in s["cpu_reasons"]:
            notes.append(f"- {r['label']}: CPU calls because {reason[:400]}")
        planned = r["plan"].get("npu_flop_share")
        if s["npu_calls"] and planned == 0:
            notes.append(
                f"- {r['label']}: the NPU answered, but the plan (`rkort inspect`) puts 0 % on it: "
                "it does not look inside control-flow branches (their FLOPs count 0 too)"
            )
        if len(r["cosines"]) > 1:
            each = ", ".join(f"{n} {v:.6f}" for n, v in r["cosines"].items())
            notes.append(f"- {r['label']}: cosine per output: {each}")
    return table, notes


def main() -> int:
    from compat.zoo.apps import APPS, model_paths, record_feeds

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(APPS), default=list(APPS))
    p.add_argument(
        "--seconds", type=float, default=4.0, help="timed calls per runner and model (about)"
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=60,
        help="first wait up to this many seconds for other work on the machine to stop",
    )
    a = p.parse_args()
    if a.max_wait > 0:
        c.wait_for_quiet(a.max_wait)
    os.environ.pop("RKORT_STRICT", None)  # a user's session: fall back and say why
    results: list[dict[str, Any]] = []
    skipped = []
    with tempfile.TemporaryDirectory(prefix="rkort-bench-zoo-") as tmp:
        cache = Path(tmp) / "cache"
        for name in a.only:
            app = APPS[name]
            if not app.installed():
                skipped.append(f"{name} ({', '.join(app.missing())} not installed)")
                continue
            c.log(f"{name}: recording what the app feeds onnxruntime")
            feeds = record_feeds(app)
            paths = model_paths(app)
            for model in app.models:
                label = f"{name}: {model}"
                c.log(f"{label}: {len(feeds[model])} call(s)")
                results.append(measure(label, paths[model], feeds[model], cache, a.seconds))
                r = results[-1]
                if r["stats"]["npu_calls"] == 0 and not any(
                    "If" in reason for reason in r["stats"]["cpu_reasons"]
                ):
                    c.log(f"{label}: nothing on the NPU; workaround row with static input shapes")
                    fixed = static_copy(paths[model], r["shapes"], Path(tmp))
                    results.append(
                        measure(
                            label + " (workaround: static input shapes)",
                            fixed,
                            feeds[model],
                            cache,
                            a.seconds,
                        )
                    )
    table, notes = rows(results)
    header = [
        "app: model",
        "input shapes (what the app feeds)",
        "FLOPs planned on the NPU",
        "segments",
        "calls on the NPU",
        "compiles",
        "first answer s rkort / onnxruntime",
        "onnxruntime ms/call",
        "rkort ms/call",
        "ratio",
        "min cosine vs onnxruntime",
        "max abs difference",
    ]
    sections = [
        c.md_table(header, table),
        "Each model gets the feeds its app gives onnxruntime (recorded by running the app), on "
        "onnxruntime's CPU session and on an `rkort.InferenceSession` with the RKNN provider "
        "(rk3588, fp16, simulator). First answer: opening the session and its first call, on an "
        "empty private cache (so with the compiles a host session makes). Per-call "
        "times: median of interleaved calls on one feed. Cosine: the lowest over the outputs and "
        f"over up to {MAX_COMPARED} recorded feeds. A call rkort answers on the CPU counts in "
        "the ratio as such.",
    ]
    if notes:
        sections.append("\n".join(notes))
    if skipped:
        sections.append("Not installed, skipped: " + ", ".join(skipped))
    c.publish("zoo", "The zoo: models real packages ship, through rkort", sections)
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    c.log(f"done in {time.perf_counter() - t0:.0f} s")
    sys.exit(code)
