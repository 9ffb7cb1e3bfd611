"""Per-call overhead of rkort's session.run() against the runtimes it wraps, and peak memory.

RKNN: the raw toolkit's ``rknn.inference()`` on the simulator, in-process (the baseline), against
rkort's ``session.run()`` with the RKNNExecutionProvider (the simulator in a worker process), the
two interleaved in blocks in one process. A breakdown times the same calls at rkort's inner
layers (engine, worker round trip) to show where the difference goes.
CPU: ``onnxruntime.InferenceSession.run`` against ``rkort.InferenceSession(providers=None).run``,
interleaved in one (other) process.
Memory: each configuration alone in a fresh process; peak RSS (VmHWM) of that process and of
rkort's worker.

    .venv/bin/python benchmarks/run_overhead.py [--calls 200] [--warmup 20]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
from _common import Side, mib, ms, secs  # noqa: E402

NAME = "run_overhead"
MEMORY_CALLS = 20  # calls after open in the memory runs (peak RSS does not grow with calls)
IDLE_GAP = 0.0003  # s of idling before each call of the "raw_idle" reference runner


# ---------------------------------------------------------------------------------------------
# Child side (runs with its console output in a log file: the toolkit's noise never shows)


def _rknn_options(cache_dir: str) -> dict[str, str]:
    return {"cache_dir": cache_dir, "fallback": "0", "progress": "0", "target": c.TARGET}


def _open_raw(model: c.Model) -> tuple[Any, dict[str, float]]:
    """The raw toolkit as a user would drive it on a host: build in-process, then the simulator."""
    t0 = time.perf_counter()
    from rknn.api import RKNN

    t1 = time.perf_counter()
    rknn = RKNN(verbose=False)
    names = list(model.inputs)
    shapes = [list(s) for s, _ in model.inputs.values()]
    for what, ret in (
        ("config", rknn.config(target_platform=c.TARGET)),
        (
            "load_onnx",
            rknn.load_onnx(
                model=str(model.path),
                inputs=names,
                input_size_list=shapes,
                outputs=list(model.outputs),
            ),
        ),
        ("build", rknn.build(do_quantization=False)),
    ):
        if ret != 0:
            raise RuntimeError(f"rknn.{what}() returned {ret}")
    t2 = time.perf_counter()
    if rknn.init_runtime() != 0:
        raise RuntimeError("rknn.init_runtime() failed")
    t3 = time.perf_counter()
    return rknn, {"import": t1 - t0, "build": t2 - t1, "init_runtime": t3 - t2, "total": t3 - t0}


def _raw_call(rknn: Any, model: c.Model) -> Callable[[], Any]:
    feed = model.feed()
    arrays = [feed[n] for n in model.inputs]
    formats = c.toolkit_data_formats([s for s, _ in model.inputs.values()])
    return lambda: rknn.inference(inputs=arrays, data_format=formats)


def _open_rkort_rknn(model: c.Model, cache_dir: str) -> Any:
    import rkort

    sess = rkort.InferenceSession(
        str(model.path),
        providers=["RKNNExecutionProvider", "CPUExecutionProvider"],
        provider_options=[_rknn_options(cache_dir), {}],
    )
    if sess.get_providers()[0] != "RKNNExecutionProvider":
        raise RuntimeError(f"rkort did not use RKNN: {sess.get_providers()}")
    return sess


def _inner_layers(
    model: c.Model, sess: Any, cache_dir: str
) -> tuple[dict[str, Callable[[], Any]], list[Callable[[], None]]]:
    """rkort's inner layers, each opened on its own (the session keeps its runners private): an
    ``RKNNEngine`` (padding, program, context pool, worker) and a bare simulator
    ``WorkerProcess`` serving the same build (the worker round trip). Each builds the model in
    a worker of its own, from the program record the session left in ``cache_dir``."""
    from rkort.cache import Cache
    from rkort.engine import RKNNEngine
    from rkort.model import ModelSource
    from rkort.options import RKNNOptions
    from rkort.planner import Planner
    from rkort.toolkit.process import WorkerProcess
    from rkort.toolkit.protocol import build_request

    feed = model.feed()
    options = RKNNOptions.parse(_rknn_options(cache_dir))
    engine = RKNNEngine(ModelSource(model.path), sess.get_inputs(), sess.get_outputs(), options)
    closers: list[Callable[[], None]] = [engine.close]
    engine_arrays = [np.ascontiguousarray(feed[n]) for n in engine.input_names]
    planner = Planner(ModelSource(model.path), options, Cache(cache_dir))
    decision, _ = planner.decide({n: s for n, (s, _) in model.inputs.items()})
    (part,) = decision.npu_parts
    assert part.spec is not None
    planner.ensure_file(decision, part)
    worker = WorkerProcess(
        "serve",
        build_request(part.spec, export=False, runtime={"target": None}),
        subject=f"{model.name} (benchmark's bare worker)",
        progress=False,
    )
    closers.append(worker.close)
    worker.wait_until("ready")
    worker_arrays = [np.ascontiguousarray(feed[n]) for n in part.spec.input_names]
    runners = {
        "engine": lambda: engine.run(engine_arrays),
        "worker": lambda: worker.call(worker_arrays),
    }
    return runners, closers


_ECHO = """
import sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
reply = conn.recv()
while True:
    try:
        msg = conn.recv()
    except EOFError:
        break
    conn.send(("ok", reply))
"""


def _echo_process(reply: list[np.ndarray]) -> tuple[Callable[[list[np.ndarray]], Any], Any]:
    """A bare process answering every message with ``reply``, over the same transport as rkort's
    worker (a socketpair carrying multiprocessing.connection pickles): the IPC floor."""
    import socket
    import subprocess
    from multiprocessing.connection import Connection

    parent, child = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(child.fileno())], pass_fds=(child.fileno(),)
    )
    child.close()
    conn = Connection(parent.detach())
    conn.send(reply)

    def call(arrays: list[np.ndarray]) -> Any:
        conn.send(("run", arrays))
        return conn.recv()

    def close() -> None:
        conn.close()
        proc.wait(timeout=10)

    return call, close


def child_rknn_latency(model: c.Model, calls: int, warmup: int) -> dict:
    rknn, _ = _open_raw(model)
    with tempfile.TemporaryDirectory(prefix="rkort-bench-cache-") as cache_dir:
        sess = _open_rkort_rknn(model, cache_dir)
        feed = model.feed()
        runners: dict[str, Callable[[], Any]] = {
            "raw": _raw_call(rknn, model),
            "rkort": lambda: sess.run(None, feed),
            # The same raw call, but not back-to-back: as it runs inside rkort's worker, which
            # sits idle in recv() between calls while the parent does its part.
            "raw_idle": c.Idled(_raw_call(rknn, model), IDLE_GAP),
        }
        closers: list[Callable[[], None]] = []
        layers_error = None
        try:
            layers, closers = _inner_layers(model, sess, cache_dir)
            runners.update(layers)
        except Exception as e:  # noqa: BLE001 - rkort's inner modules moved: no breakdown
            layers_error = f"{type(e).__name__}: {e}"
        echo, close_echo = _echo_process([np.asarray(o) for o in runners["raw"]()])
        closers.append(close_echo)
        raw_arrays = [feed[n] for n in model.inputs]
        runners["echo"] = lambda: echo(raw_arrays)
        samples = c.interleave(runners, calls, warmup)
        raw_out = runners["raw"]()[0]
        rk_out = sess.run(None, feed)[0]
        import onnxruntime as ort

        cpu_out = ort.InferenceSession(str(model.path)).run(None, feed)[0]
        result = {
            "stats": {k: c.Stats.of(v).as_dict() for k, v in samples.items()},
            "cos_rkort_raw": c.cosine(rk_out, raw_out),
            "cos_rkort_cpu": c.cosine(rk_out, cpu_out),
            "layers_error": layers_error,
        }
        for close in closers:
            close()
        runners.clear()
        sess = None  # its workers close with it
        gc.collect()
    rknn.release()
    return result


def child_cpu_latency(model: c.Model, calls: int, warmup: int) -> dict:
    import onnxruntime as ort

    import rkort

    feed = model.feed()
    ort_sess = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    rk_sess = rkort.InferenceSession(str(model.path), providers=None)
    samples = c.interleave(
        {"ort": lambda: ort_sess.run(None, feed), "rkort": lambda: rk_sess.run(None, feed)},
        calls,
        warmup,
    )
    diff = float(np.abs(ort_sess.run(None, feed)[0] - rk_sess.run(None, feed)[0]).max())
    return {"stats": {k: c.Stats.of(v).as_dict() for k, v in samples.items()}, "max_abs": diff}


def child_memory(model: c.Model, mode: str) -> dict:
    """One configuration alone in this (fresh) process: import, open, run, and the peaks.
    Nothing but numpy is imported before the timed import."""
    feed = model.feed()
    held: list[Any] = []  # what the process holds until the figures are taken

    def load() -> Any:
        if mode == "raw":
            import rknn.api  # noqa: F401

            return None
        if mode in ("rkort-rknn", "rkort-cpu"):
            import rkort

            return rkort
        if mode == "ort":
            import onnxruntime

            return onnxruntime
        raise ValueError(mode)

    def open_session(rt: Any) -> tuple[Callable[[], Any], dict[str, Any]]:
        if mode == "raw":
            rknn, times = _open_raw(model)
            held.append(rknn)
            return _raw_call(rknn, model), times
        if mode == "rkort-rknn":
            # Under the child's working directory, which run_child removes afterwards.
            cache_dir = tempfile.mkdtemp(prefix="rkort-bench-cache-", dir=os.getcwd())
            sess = _open_rkort_rknn(model, cache_dir)
        else:
            sess = rt.InferenceSession(str(model.path), providers=None)
        held.append(sess)
        return lambda: sess.run(None, feed), {}

    result = c.measure_alone(load, open_session, MEMORY_CALLS)
    if mode == "rkort-rknn":
        import rkort

        result["info"]["contexts"] = len(rkort.session_stats(held[0])["contexts"])
    del held[:]
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------
# Parent side


def _models(directory: Path) -> dict[str, c.Model]:
    return {"mlp": c.mlp(directory), "bert": c.bert(directory)}


def _segments(model: c.Model) -> str:
    """The plan `rkort inspect` reports for the model: its NPU and CPU segments."""
    from rkort.cli.inspect import build_report

    segments = build_report(str(model.path), c.TARGET, [], {})["segments"]
    npu = sum(1 for s in segments if s["device"] == "npu")
    return f"{npu} NPU + {len(segments) - npu} CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=200, help="timed calls per runner (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls first (default 20)")
    p.add_argument("--models", nargs="*", default=["mlp", "bert"], choices=["mlp", "bert"])
    a = p.parse_args()
    me = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="rkort-bench-") as tmp:
        c.private_default_cache(Path(tmp))
        models = _models(c.models_dir(Path(tmp) / "models"))
        logfile = Path(tmp) / "children.log"

        def child(kind: str, model: c.Model, **params: Any) -> dict:
            return c.run_child(me, kind, logfile, model=model, **params)

        lat_rows, cpu_rows, mem_rows, brk_rows, open_rows = [], [], [], [], []
        busy_rows: list[list[str]] = []
        notes = []
        for key in a.models:
            m = models[key]
            label = f"{m.name} ({mib(m.size)} MiB)"
            c.log(f"{m.name}: RKNN latency (raw toolkit vs rkort, interleaved) ...")
            r = child("rknn-latency", m, calls=a.calls, warmup=a.warmup)
            st = r["stats"]
            raw, rk = st["raw"], st["rkort"]
            lat_rows += c.pair_rows(
                [label, "RKNN sim"],
                Side("raw `rknn.inference()` in-process", [raw["median"], raw["p90"]]),
                Side("rkort `session.run()` (worker)", [rk["median"], rk["p90"]]),
            )
            if "worker" in st:
                brk_rows += _breakdown(m, st)
            else:
                notes.append(f"{m.name}: no breakdown ({r['layers_error']})")
            busy_rows.append([m.name, "RKNN", c.busy(r)])
            notes.append(
                f"{m.name}: cosine(rkort RKNN output, raw toolkit output) = "
                f"{r['cos_rkort_raw']:.7f}; vs onnxruntime CPU = {r['cos_rkort_cpu']:.7f}"
            )

            c.log(f"{m.name}: CPU latency (onnxruntime vs rkort providers=None, interleaved) ...")
            r = child("cpu-latency", m, calls=a.calls, warmup=a.warmup)
            o, k = r["stats"]["ort"], r["stats"]["rkort"]
            busy_rows.append([m.name, "CPU", c.busy(r)])
            cpu_rows += c.pair_rows(
                [label, "CPU"],
                Side("onnxruntime `InferenceSession.run()`", [o["median"], o["p90"]]),
                Side("rkort `InferenceSession(providers=None).run()`", [k["median"], k["p90"]]),
            )
            notes.append(f"{m.name}: max |rkort CPU - onnxruntime| = {r['max_abs']:.3g}")

            mem = {}
            for mode in ("raw", "rkort-rknn", "ort", "rkort-cpu"):
                c.log(f"{m.name}: memory and open time, {mode} alone in a fresh process ...")
                mem[mode] = child("memory", m, mode=mode)
            raw_m, rk_m = mem["raw"], mem["rkort-rknn"]
            wk = rk_m["worker_peak"]
            mem_rows += c.pair_rows(
                [m.name, "RKNN sim"],
                Side("raw toolkit, in-process", [raw_m["peak"], "-", raw_m["peak"]]),
                Side(
                    "rkort (user process + worker(s))",
                    [rk_m["peak"], wk, rk_m["peak"] + wk if wk else None],
                ),
                fmt=mib,
                ratios=(0, 2),
            )
            mem_rows += c.pair_rows(
                [m.name, "CPU"],
                Side("onnxruntime", [mem["ort"]["peak"], "-", mem["ort"]["peak"]]),
                Side(
                    "rkort providers=None",
                    [mem["rkort-cpu"]["peak"], "-", mem["rkort-cpu"]["peak"]],
                ),
                fmt=mib,
                ratios=(0, 2),
            )
            bi_raw = raw_m["info"]
            contexts = rk_m["info"].get("contexts")
            of_which = f"segments: {_segments(m)}" + (
                f", {contexts} context(s)" if contexts is not None else ""
            )
            open_rows += c.pair_rows(
                [m.name],
                _open_side(
                    "raw toolkit (`rknn.api`; RKNN()+config+load_onnx+build, init_runtime)",
                    raw_m,
                    f"build {secs(bi_raw['build'])}, init_runtime {secs(bi_raw['init_runtime'])}",
                ),
                _open_side(
                    "rkort RKNN session, empty private cache (build+export+cache in worker)",
                    rk_m,
                    of_which,
                ),
                fmt=secs,
                ratios=(3,),
            )
            open_rows += c.pair_rows(
                [m.name],
                _open_side("onnxruntime CPU session", mem["ort"], ""),
                _open_side("rkort providers=None", mem["rkort-cpu"], ""),
                fmt=secs,
                ratios=(3,),
            )

    lat_hdr = ["model", "provider", "what", "median ms", "p90 ms", "median ratio", "p90 ratio"]
    sections = [
        f"Per-call latency, {a.calls} timed calls after {a.warmup} warm-up calls per runner, "
        f"interleaved in {c.ROUNDS} rounds within one process per pair.",
        "### RKNN provider (simulator)\n\n" + c.md_table(lat_hdr, lat_rows),
        "### CPU provider\n\n" + c.md_table(lat_hdr, cpu_rows),
    ]
    sections.append(
        "Other work on the machine during each latency run (CPU time of every process but the "
        "benchmark's, as a share of all CPUs; 0% = quiet):\n\n"
        + c.md_table(["model", "pair", "others' CPU"], busy_rows)
    )
    if brk_rows:
        sections.append(
            "### Where rkort's RKNN per-call time goes\n\nMedians of the same interleaved run, each "
            "row timing rkort one layer further out; 'added' is a difference of medians (noise "
            "when small or negative). The worker and engine layers are opened on their own "
            "(a bare `WorkerProcess` and an `RKNNEngine`, each with a simulator worker of its "
            "own, from the program record the session left), not read out of the session.\n\n"
            + c.md_table(["model", "layer", "median ms", "added ms"], brk_rows)
        )
    sections.append(
        "### Peak RSS (VmHWM, MiB): each configuration alone in a fresh process, "
        f"session open + {MEMORY_CALLS} calls\n\n"
        + c.md_table(
            [
                "model",
                "provider",
                "configuration",
                "user process",
                "worker",
                "total",
                "user ratio",
                "total ratio",
            ],
            mem_rows,
        )
        + "\n\nWorkers: the session's simulator worker processes (children running "
        "`rkort.toolkit.child serve`), found in the process table."
    )
    sections.append(
        "### Session open time (s), same fresh processes (first import of the runtime + session)\n\n"
        + c.md_table(
            [
                "model",
                "what",
                "import s",
                "session s",
                "of which",
                "total s",
                "ratio",
                "others' CPU",
            ],
            open_rows,
        )
    )
    sections.append("Sanity: " + "; ".join(notes) + ".")
    c.publish(NAME, "run_overhead: per-call overhead and memory", sections)


def _breakdown(m: c.Model, st: dict[str, dict[str, float]]) -> list[list[str]]:
    rows = []
    layers = [
        ("raw `rknn.inference()` in-process", st["raw"]),
        ("+ IPC: `WorkerProcess.call()` round trip", st["worker"]),
        ("+ runner/engine: `RKNNEngine.run()`", st["engine"]),
        ("+ session: `InferenceSession.run()`", st["rkort"]),
    ]
    prev = None
    for what, s in layers:
        added = "" if prev is None else ms(s["median"] - prev["median"])
        rows.append([m.name, what, ms(s["median"]), added])
        prev = s
    idle = st["raw_idle"]["median"]
    rows.append(
        [
            m.name,
            f"(reference) raw `rknn.inference()` after {IDLE_GAP * 1e3:.1f} ms idle "
            "(not back-to-back), call alone timed",
            ms(idle),
            ms(idle - st["raw"]["median"]) + " vs raw",
        ]
    )
    rows.append(
        [
            m.name,
            "(reference) echo process, same transport, no toolkit: IPC floor",
            ms(st["echo"]["median"]),
            "",
        ]
    )
    return rows


def _open_side(what: str, res: dict, of_which: str) -> Side:
    return Side(
        what,
        [res["import"], res["session"], of_which, res["import"] + res["session"]],
        [c.busy(res)],
    )


if __name__ == "__main__":
    c.main(
        main,
        {
            "rknn-latency": child_rknn_latency,
            "cpu-latency": child_cpu_latency,
            "memory": child_memory,
        },
    )
