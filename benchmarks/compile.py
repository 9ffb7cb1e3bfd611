"""Compile time: the raw toolkit's fp16 build in-process against rkort's `rkort warmup` path.

Raw: ``RKNN()`` + ``config(target_platform=rk3588)`` + ``load_onnx`` + ``build(do_quantization=False)``
+ ``export_rknn``, timed in-process in a process that has already imported the toolkit and built
once (the import is timed separately: a fresh process pays it too).
rkort: what ``rkort warmup`` does, ``rkort.parts.compile_to_cache`` through a fresh private cache,
which runs the toolkit in a child process (spawn + toolkit import + the same calls + cache commit).
Each rep runs the raw child, then rkort, for every model; medians over the reps.

    .venv/bin/python benchmarks/compile.py [--reps 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "compile"


def _models(directory: Path) -> dict[str, c.Model]:
    return {"mlp": c.mlp(directory), "bert": c.bert(directory)}


# ---------------------------------------------------------------------------------------------
# Child: the raw toolkit, in-process (console output goes to a log file)


def _raw_build(RKNN: Any, model: c.Model, blob: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    rknn = RKNN(verbose=False)
    steps = {}
    calls = [
        (
            "config",
            lambda: rknn.config(
                target_platform=c.TARGET, float_dtype="float16", optimization_level=3
            ),
        ),
        (
            "load_onnx",
            lambda: rknn.load_onnx(
                model=str(model.path),
                inputs=list(model.inputs),
                input_size_list=[list(s) for s, _ in model.inputs.values()],
                outputs=list(model.outputs),
            ),
        ),
        ("build", lambda: rknn.build(do_quantization=False)),
        ("export_rknn", lambda: rknn.export_rknn(str(blob))),
    ]
    for name, fn in calls:
        t = time.perf_counter()
        ret = fn()
        steps[name] = time.perf_counter() - t
        if ret != 0:
            raise RuntimeError(f"rknn.{name}() returned {ret}")
    total = time.perf_counter() - t0
    rknn.release()
    return {"total": total, **steps}


def child_raw(models: str) -> dict[str, Any]:
    built = _models(Path(models))
    work = Path(os.getcwd())
    t = time.perf_counter()
    from rknn.api import RKNN

    result: dict[str, Any] = {"import": time.perf_counter() - t, "models": {}}
    _raw_build(RKNN, built["mlp"], work / "warmup.rknn")  # untimed: first-build lazy init
    for key, m in built.items():
        blob = work / f"{key}.rknn"
        times = _raw_build(RKNN, m, blob)
        data = blob.read_bytes()
        times["blob_bytes"] = len(data)
        times["sha256"] = hashlib.sha256(data).hexdigest()
        result["models"][key] = times
    # Is the toolkit's output deterministic? The untimed first build was of the same MLP.
    result["mlp_rebuild_identical"] = (work / "warmup.rknn").read_bytes() == (
        work / "mlp.rknn"
    ).read_bytes()
    return result


# ---------------------------------------------------------------------------------------------
# Parent: rkort warmup-equivalent


def rkort_compile(model: c.Model) -> dict[str, Any]:
    import onnxruntime

    from rkort.cache import Cache
    from rkort.model import ModelSource
    from rkort.options import RKNNOptions
    from rkort.parts import compile_to_cache
    from rkort.planner import Planner

    with tempfile.TemporaryDirectory(prefix="rkort-bench-cache-") as cache_dir:
        t0 = time.perf_counter()
        # As `rkort warmup` does: onnxruntime reads the model first, then the planner decides.
        options = RKNNOptions.parse({"target": c.TARGET, "cache_dir": cache_dir, "progress": "0"})
        onnxruntime.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
        planner = Planner(ModelSource(model.path), options, Cache(cache_dir))
        decision, _ = planner.decide({n: s for n, (s, _) in model.inputs.items()})
        (part,) = decision.npu_parts
        t1 = time.perf_counter()
        entry, built = compile_to_cache(planner, decision, part, progress=False)
        t2 = time.perf_counter()
        if not built:
            raise RuntimeError("a fresh cache already had the blob?")
        data = entry.blob_path.read_bytes()
        return {
            "prelude": t1 - t0,
            "compile": t2 - t1,
            "child_build": float(entry.meta.get("build_seconds", float("nan"))),
            "blob_bytes": entry.size,
            "sha256": hashlib.sha256(data).hexdigest(),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    a = p.parse_args()
    me = Path(__file__).resolve()
    raw_runs: list[dict] = []
    rk_runs: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="rkort-bench-") as tmp:
        c.private_default_cache(Path(tmp))
        mdir = c.models_dir(Path(tmp) / "models")
        models = _models(mdir)
        logfile = Path(tmp) / "children.log"
        for rep in range(a.reps):
            c.log(f"rep {rep + 1}/{a.reps}: raw toolkit builds in-process (child process) ...")
            raw_runs.append(c.run_child(me, "raw", logfile, models=str(mdir)))
            c.log(f"rep {rep + 1}/{a.reps}: rkort compile_to_cache (fresh caches) ...")
            rk_runs.append({key: rkort_compile(m) for key, m in models.items()})
        sizes = {key: m.size for key, m in models.items()}  # the files go with the directory

    med = statistics.median
    imp = med(r["import"] for r in raw_runs)
    rows, step_rows, size_rows = [], [], []
    for key, m in models.items():
        raw = [r["models"][key] for r in raw_runs]
        rk = [r[key] for r in rk_runs]
        raw_t = med(x["total"] for x in raw)
        rk_t = med(x["compile"] for x in rk)
        child = med(x["child_build"] for x in rk)
        label = f"{m.name} ({c.mib(sizes[key])} MiB)"
        rows.append([label, "raw toolkit build+export, in-process", c.secs(raw_t), "1.00x", ""])
        rows.append(
            [
                label,
                "raw toolkit, fresh process (toolkit import + build+export)",
                c.secs(imp + raw_t),
                c.ratio(imp + raw_t, raw_t),
                "",
            ]
        )
        rows.append(
            [
                label,
                "rkort `compile_to_cache` (child process, fresh cache)",
                c.secs(rk_t),
                c.ratio(rk_t, raw_t),
                c.ratio(rk_t, imp + raw_t),
            ]
        )
        step_rows.append(
            [
                m.name,
                " / ".join(
                    c.secs(med(x[s] for x in raw))
                    for s in ("config", "load_onnx", "build", "export_rknn")
                ),
                c.secs(child),
                c.secs(rk_t - child),
                c.secs(med(x["prelude"] for x in rk)),
            ]
        )
        raw_size = med(x["blob_bytes"] for x in raw)
        rk_size = med(x["blob_bytes"] for x in rk)
        same = len({x["sha256"] for x in raw} | {x["sha256"] for x in rk}) == 1
        size_rows.append(
            [
                m.name,
                c.mib(sizes[key]),
                c.mib(raw_size),
                c.mib(rk_size),
                c.ratio(rk_size, raw_size),
                f"{int(rk_size - raw_size):+d}",
                f"{raw_size / sizes[key]:.0%}",
                "yes" if same else "no",
            ]
        )

    sections = [
        f"Median of {a.reps} reps. Toolkit import (median, fresh process): {c.secs(imp)} s.",
        c.md_table(
            ["model", "what", "wall s", "ratio vs in-process", "ratio vs fresh process"], rows
        ),
        "### Where the time goes (medians, s)\n\n"
        + c.md_table(
            [
                "model",
                "raw: config / load_onnx / build / export_rknn",
                "rkort: build+export inside the child",
                "rkort: spawn + import + cache commit",
                "warmup prelude (ORT session + the planner's decision), not in the ratio",
            ],
            step_rows,
        ),
        "### Blob sizes (MiB)\n\n"
        + c.md_table(
            [
                "model",
                "ONNX",
                "raw blob",
                "rkort blob",
                "ratio",
                "rkort - raw (bytes)",
                "blob/ONNX",
                "byte-identical (all reps, both)",
            ],
            size_rows,
        )
        + "\n\nTwo raw builds of the same MLP in one process byte-identical: "
        + ", ".join("yes" if r.get("mlp_rebuild_identical") else "no" for r in raw_runs)
        + " (one per rep).",
    ]
    c.publish(NAME, "compile: raw toolkit fp16 build vs rkort warmup", sections)


if __name__ == "__main__":
    c.main(main, {"raw": child_raw})
