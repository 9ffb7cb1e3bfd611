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
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "run_overhead"
MEMORY_CALLS = 20  # calls after open in the memory runs (peak RSS does not grow with calls)
IDLE_GAP = 0.0003  # s of idling before each call of the "raw_idle" reference runner
ROUNDS = 20  # interleaving: each runner gets calls/ROUNDS calls per round, in turn


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


def _open_rkort_rknn(model: c.Model, cache_dir: str) -> tuple[Any, float]:
    t0 = time.perf_counter()
    import rkort

    sess = rkort.InferenceSession(
        str(model.path),
        providers=["RKNNExecutionProvider", "CPUExecutionProvider"],
        provider_options=[_rknn_options(cache_dir), {}],
    )
    elapsed = time.perf_counter() - t0
    if sess.get_providers()[0] != "RKNNExecutionProvider":
        raise RuntimeError(f"rkort did not use RKNN: {sess.get_providers()}")
    return sess, elapsed


def _npu_runners(sess: Any) -> tuple[list[Any], int]:
    """The runners behind an rkort RKNN session, and how many CPU segments it has. Private
    attributes that other rkort work keeps reshaping: every layout seen so far is handled, and
    anything else gives ([], 0) (the breakdown and worker memory are then left out)."""
    engine = getattr(sess, "_rknn", None)
    single = getattr(engine, "_runner", None)
    if single is not None:
        return [single], 0
    runners: list[Any] = []
    cpu = 0
    for value in getattr(engine, "_programs", {}).values():
        for seg in getattr(value, "segments", ()):
            if getattr(seg, "runner", None) is not None:
                runners.append(seg.runner)
            else:
                cpu += 1
    if runners or cpu:
        return runners, cpu
    for value in getattr(engine, "_runners", {}).values():
        item = value[0] if isinstance(value, tuple) else value
        program = getattr(item, "program", None)
        if program is not None:
            for seg in program.segments:
                if getattr(seg, "runner", None) is not None:
                    runners.append(seg.runner)
                else:
                    cpu += 1
        elif getattr(item, "runner", None) is not None:
            runners.append(item.runner)
        elif hasattr(item, "pid"):
            runners.append(item)
    return runners, cpu


def _runner(sess: Any) -> Any:
    """The one simulator runner of a session that runs the whole model as one NPU graph."""
    runners, cpu = _npu_runners(sess)
    return runners[0] if len(runners) == 1 and cpu == 0 else None


def _close(sess: Any) -> None:
    close = getattr(sess, "_close_rknn", None)
    if close is not None:
        close()


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


class Idled:
    """A runner that idles ``gap`` seconds before each call, untimed: the call is timed alone."""

    def __init__(self, fn: Callable[[], Any], gap: float) -> None:
        self.fn, self.gap = fn, gap

    def __call__(self) -> Any:
        return self.fn()

    def timed(self, calls: int) -> list[float]:
        out = []
        for _ in range(calls):
            time.sleep(self.gap)
            t = time.perf_counter()
            self.fn()
            out.append(time.perf_counter() - t)
        return out


def _interleave(runners: dict[str, Callable[[], Any]], calls: int, warmup: int) -> dict[str, list]:
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    per_round = max(1, calls // ROUNDS)
    for r in range(ROUNDS):
        order = list(runners.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            if isinstance(fn, Idled):
                samples[name] += fn.timed(per_round)
            else:
                samples[name] += c.time_calls(fn, per_round, 0)
    return samples


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def child_rknn_latency(model: c.Model, calls: int, warmup: int) -> dict:
    rknn, _ = _open_raw(model)
    with tempfile.TemporaryDirectory(prefix="rkort-bench-cache-") as cache_dir:
        sess, _ = _open_rkort_rknn(model, cache_dir)
        feed = model.feed()
        runners: dict[str, Callable[[], Any]] = {
            "raw": _raw_call(rknn, model),
            "rkort": lambda: sess.run(None, feed),
            # The same raw call, but not back-to-back: as it runs inside rkort's worker, which
            # sits idle in recv() between calls while the parent does its part.
            "raw_idle": Idled(_raw_call(rknn, model), IDLE_GAP),
        }
        # rkort's layers, innermost last (private attributes: skipped if they moved).
        engine = sess._rknn
        worker = getattr(_runner(sess), "_worker", None)
        if worker is not None and hasattr(engine, "run"):
            arrays = [np.ascontiguousarray(feed[n]) for n in engine.input_names]
            runners["engine"] = lambda: engine.run(arrays)
            runners["worker"] = lambda: worker.call(arrays)
        echo, close_echo = _echo_process([np.asarray(o) for o in runners["raw"]()])
        raw_arrays = [feed[n] for n in model.inputs]
        runners["echo"] = lambda: echo(raw_arrays)
        samples = _interleave(runners, calls, warmup)
        raw_out = runners["raw"]()[0]
        rk_out = sess.run(None, feed)[0]
        import onnxruntime as ort

        cpu_out = ort.InferenceSession(str(model.path)).run(None, feed)[0]
        result = {
            "stats": {k: c.Stats.of(v).as_dict() for k, v in samples.items()},
            "cos_rkort_raw": _cosine(rk_out, raw_out),
            "cos_rkort_cpu": _cosine(rk_out, cpu_out),
        }
        _close(sess)
        close_echo()
    rknn.release()
    return result


def child_cpu_latency(model: c.Model, calls: int, warmup: int) -> dict:
    import onnxruntime as ort

    import rkort

    feed = model.feed()
    ort_sess = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    rk_sess = rkort.InferenceSession(str(model.path), providers=None)
    samples = _interleave(
        {"ort": lambda: ort_sess.run(None, feed), "rkort": lambda: rk_sess.run(None, feed)},
        calls,
        warmup,
    )
    diff = float(np.abs(ort_sess.run(None, feed)[0] - rk_sess.run(None, feed)[0]).max())
    return {"stats": {k: c.Stats.of(v).as_dict() for k, v in samples.items()}, "max_abs": diff}


def child_memory(model: c.Model, mode: str, calls: int) -> dict:
    """One configuration alone in this (fresh) process: import, open, run ``calls`` times, and
    report the peaks. Nothing but numpy is imported before the timed import."""
    feed = model.feed()
    worker_peak = None
    build_info: dict[str, Any] = {}
    t0 = time.perf_counter()
    if mode == "raw":
        import rknn.api  # noqa: F401

        t1 = time.perf_counter()
        rknn, times = _open_raw(model)
        t2 = time.perf_counter()
        fn = _raw_call(rknn, model)
        build_info = times
    elif mode == "rkort-rknn":
        import rkort  # noqa: F401

        t1 = time.perf_counter()
        # Under the child's working directory, which run_child removes afterwards.
        cache_dir = tempfile.mkdtemp(prefix="rkort-bench-cache-", dir=os.getcwd())
        sess, _ = _open_rkort_rknn(model, cache_dir)
        t2 = time.perf_counter()
        fn = lambda: sess.run(None, feed)  # noqa: E731
        build_info = dict(getattr(_runner(sess), "build_info", {}))
    elif mode in ("ort", "rkort-cpu"):
        if mode == "ort":
            import onnxruntime as rt
        else:
            import rkort as rt  # type: ignore[no-redef]
        t1 = time.perf_counter()
        s = rt.InferenceSession(str(model.path), providers=None)
        t2 = time.perf_counter()
        fn = lambda: s.run(None, feed)  # noqa: E731
    else:
        raise ValueError(mode)
    for _ in range(calls):
        fn()
    if mode == "rkort-rknn":
        runners, cpu_segments = _npu_runners(sess)
        pids = [int(r.pid) for r in runners if getattr(r, "pid", None) is not None]
        if pids:
            worker_peak = sum(c.peak_rss(pid) for pid in pids)
        build_info["segments"] = f"{len(runners)} NPU + {cpu_segments} CPU"
        _close(sess)
    return {
        "import": t1 - t0,
        "session": t2 - t1,
        "peak": c.peak_rss(),
        "worker_peak": worker_peak,
        "build_info": build_info,
    }


def child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--mode", default="")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    model = _models(Path(a.models))[a.model]
    if a.child == "rknn-latency":
        res = child_rknn_latency(model, a.calls, a.warmup)
    elif a.child == "cpu-latency":
        res = child_cpu_latency(model, a.calls, a.warmup)
    elif a.child == "memory":
        res = child_memory(model, a.mode, MEMORY_CALLS)
    else:
        raise ValueError(a.child)
    c.write_json(a.out, res)
    os._exit(0)  # skip the toolkit's teardown (its native threads can hang at exit)


# ---------------------------------------------------------------------------------------------
# Parent side


def _models(directory: Path) -> dict[str, c.Model]:
    return {"mlp": c.mlp(directory), "bert": c.bert(directory)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=200, help="timed calls per runner (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls first (default 20)")
    p.add_argument("--models", nargs="*", default=["mlp", "bert"], choices=["mlp", "bert"])
    a = p.parse_args()
    me = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="rkort-bench-") as tmp:
        c.private_default_cache(Path(tmp))
        mdir = c.models_dir(Path(tmp) / "models")
        models = _models(mdir)
        logfile = Path(tmp) / "children.log"

        def child(kind: str, key: str, *extra: str) -> dict:
            args = [kind, "--models", str(mdir), "--model", key]
            args += ["--calls", str(a.calls), "--warmup", str(a.warmup), *extra]
            return c.run_child(me, args, logfile)

        lat_rows, cpu_rows, mem_rows, brk_rows, open_rows = [], [], [], [], []
        busy_rows: list[list[str]] = []
        notes = []
        for key in a.models:
            m = models[key]
            label = f"{m.name} ({c.mib(m.size)} MiB)"
            c.log(f"{m.name}: RKNN latency (raw toolkit vs rkort, interleaved) ...")
            r = child("rknn-latency", key)
            st = r["stats"]
            raw, rk = st["raw"], st["rkort"]
            lat_rows.append(
                [
                    label,
                    "RKNN sim",
                    "raw `rknn.inference()` in-process",
                    ms(raw["median"]),
                    ms(raw["p90"]),
                    "1.00x",
                    "1.00x",
                ]
            )
            lat_rows.append(
                [
                    label,
                    "RKNN sim",
                    "rkort `session.run()` (worker)",
                    ms(rk["median"]),
                    ms(rk["p90"]),
                    c.ratio(rk["median"], raw["median"]),
                    c.ratio(rk["p90"], raw["p90"]),
                ]
            )
            if "worker" in st:
                layers = [
                    ("raw `rknn.inference()` in-process", raw),
                    ("+ IPC: `WorkerProcess.call()` round trip", st["worker"]),
                    ("+ runner/engine: `RKNNEngine.run()`", st["engine"]),
                    ("+ session: `InferenceSession.run()`", rk),
                ]
                prev = None
                for what, s in layers:
                    added = "" if prev is None else ms(s["median"] - prev["median"])
                    brk_rows.append([m.name, what, ms(s["median"]), added])
                    prev = s
                brk_rows.append(
                    [
                        m.name,
                        f"(reference) raw `rknn.inference()` after {IDLE_GAP * 1e3:.1f} ms idle "
                        "(not back-to-back), call alone timed",
                        ms(st["raw_idle"]["median"]),
                        ms(st["raw_idle"]["median"] - raw["median"]) + " vs raw",
                    ]
                )
                brk_rows.append(
                    [
                        m.name,
                        "(reference) echo process, same transport, no toolkit: IPC floor",
                        ms(st["echo"]["median"]),
                        "",
                    ]
                )
            busy_rows.append([m.name, "RKNN", f"{r['_others_cpu']:.0%}"])
            notes.append(
                f"{m.name}: cosine(rkort RKNN output, raw toolkit output) = "
                f"{r['cos_rkort_raw']:.7f}; vs onnxruntime CPU = {r['cos_rkort_cpu']:.7f}"
            )

            c.log(f"{m.name}: CPU latency (onnxruntime vs rkort providers=None, interleaved) ...")
            r = child("cpu-latency", key)
            o, k = r["stats"]["ort"], r["stats"]["rkort"]
            busy_rows.append([m.name, "CPU", f"{r['_others_cpu']:.0%}"])
            cpu_rows.append(
                [
                    label,
                    "CPU",
                    "onnxruntime `InferenceSession.run()`",
                    ms(o["median"]),
                    ms(o["p90"]),
                    "1.00x",
                    "1.00x",
                ]
            )
            cpu_rows.append(
                [
                    label,
                    "CPU",
                    "rkort `InferenceSession(providers=None).run()`",
                    ms(k["median"]),
                    ms(k["p90"]),
                    c.ratio(k["median"], o["median"]),
                    c.ratio(k["p90"], o["p90"]),
                ]
            )
            notes.append(f"{m.name}: max |rkort CPU - onnxruntime| = {r['max_abs']:.3g}")

            mem = {}
            for mode in ("raw", "rkort-rknn", "ort", "rkort-cpu"):
                c.log(f"{m.name}: memory and open time, {mode} alone in a fresh process ...")
                mem[mode] = child("memory", key, "--mode", mode)
            raw_m, rk_m = mem["raw"], mem["rkort-rknn"]
            wk = rk_m["worker_peak"] or 0
            mem_rows += [
                [
                    m.name,
                    "RKNN sim",
                    "raw toolkit, in-process",
                    mib(raw_m["peak"]),
                    "-",
                    mib(raw_m["peak"]),
                    "1.00x",
                    "1.00x",
                ],
                [
                    m.name,
                    "RKNN sim",
                    "rkort (user process + worker(s))",
                    mib(rk_m["peak"]),
                    mib(wk) if wk else "n/a",
                    mib(rk_m["peak"] + wk) if wk else "n/a",
                    c.ratio(rk_m["peak"], raw_m["peak"]),
                    c.ratio(rk_m["peak"] + wk, raw_m["peak"]) if wk else "n/a",
                ],
                [
                    m.name,
                    "CPU",
                    "onnxruntime",
                    mib(mem["ort"]["peak"]),
                    "-",
                    mib(mem["ort"]["peak"]),
                    "1.00x",
                    "1.00x",
                ],
                [
                    m.name,
                    "CPU",
                    "rkort providers=None",
                    mib(mem["rkort-cpu"]["peak"]),
                    "-",
                    mib(mem["rkort-cpu"]["peak"]),
                    c.ratio(mem["rkort-cpu"]["peak"], mem["ort"]["peak"]),
                    c.ratio(mem["rkort-cpu"]["peak"], mem["ort"]["peak"]),
                ],
            ]
            bi_raw, bi_rk = raw_m["build_info"], rk_m["build_info"]
            open_rows += [
                [
                    m.name,
                    "raw toolkit (`rknn.api`; RKNN()+config+load_onnx+build, init_runtime)",
                    secs(raw_m["import"]),
                    secs(raw_m["session"]),
                    f"build {secs(bi_raw['build'])}, init_runtime {secs(bi_raw['init_runtime'])}",
                    secs(raw_m["import"] + raw_m["session"]),
                    "1.00x",
                    _busy(raw_m),
                ],
                [
                    m.name,
                    "rkort RKNN session, empty private cache (build+export+cache in worker)",
                    secs(rk_m["import"]),
                    secs(rk_m["session"]),
                    _build_info(bi_rk),
                    secs(rk_m["import"] + rk_m["session"]),
                    c.ratio(rk_m["import"] + rk_m["session"], raw_m["import"] + raw_m["session"]),
                    _busy(rk_m),
                ],
                [
                    m.name,
                    "onnxruntime CPU session",
                    secs(mem["ort"]["import"]),
                    secs(mem["ort"]["session"]),
                    "",
                    secs(mem["ort"]["import"] + mem["ort"]["session"]),
                    "1.00x",
                    _busy(mem["ort"]),
                ],
                [
                    m.name,
                    "rkort providers=None",
                    secs(mem["rkort-cpu"]["import"]),
                    secs(mem["rkort-cpu"]["session"]),
                    "",
                    secs(mem["rkort-cpu"]["import"] + mem["rkort-cpu"]["session"]),
                    c.ratio(
                        mem["rkort-cpu"]["import"] + mem["rkort-cpu"]["session"],
                        mem["ort"]["import"] + mem["ort"]["session"],
                    ),
                    _busy(mem["rkort-cpu"]),
                ],
            ]

    lat_hdr = ["model", "provider", "what", "median ms", "p90 ms", "median ratio", "p90 ratio"]
    sections = [
        f"Per-call latency, {a.calls} timed calls after {a.warmup} warm-up calls per runner, "
        f"interleaved in {ROUNDS} rounds within one process per pair.",
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
            "when small or negative).\n\n"
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


def _busy(res: dict) -> str:
    return f"{res['_others_cpu']:.0%}" if "_others_cpu" in res else "?"


def _build_info(info: dict) -> str:
    parts = [f"segments: {info['segments']}"] if "segments" in info else []
    if "build_seconds" in info:
        parts.append(f"worker build {secs(info['build_seconds'])}")
    if "runtime_seconds" in info:
        parts.append(f"init_runtime {secs(info['runtime_seconds'])}")
    return ", ".join(parts)


ms, secs, mib = c.ms, c.secs, c.mib

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[1:])
    else:
        main()
