"""Throughput of one session with concurrent callers on the host simulator, and what contexts and
live shapes cost in memory.

1. One RKNN session (provider option ``contexts`` left at auto: one context per NPU core of the
   target, at most one per CPU; on the host a context is a simulator worker process, and the
   second opens when calls overlap) called by 1, 2 and 3 threads in turn, in interleaved rounds:
   calls per second, and their ratio to one caller. Reference: a session with ``contexts=1``
   called by 2 threads (calls take turns on one context). The same again with each worker
   pinned to a CPU of its own (as each context runs on an NPU core of its own on a board).
2. Memory of contexts: RSS of the user process and of the workers with one context open, then
   with two (what one more context costs on the host); the blob size (what it costs on a board:
   each ``RKNNLite`` context loads the blob again).
3. Memory of live shapes: a BERT-like encoder with dynamic axes, buckets 16,32,64,128, one call
   of each length: RSS of the user process and of each worker after each call, and the blobs.

    .venv/bin/python benchmarks/throughput.py [--rounds 8] [--block 0.5]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
from _common import mib, ms  # noqa: E402

NAME = "throughput"
CALLERS = (1, 2, 3)
BUCKETS = (16, 32, 64, 128)
LENGTHS = (12, 30, 60, 120)  # one call each: padded to 16, 32, 64 and 128


def _session(model: c.Model, cache_dir: str, **options: str) -> Any:
    import rkort

    sess = rkort.InferenceSession(
        str(model.path),
        providers=[
            (
                "RKNNExecutionProvider",
                {"cache_dir": cache_dir, "fallback": "0", "progress": "0", **options},
            ),
            "CPUExecutionProvider",
        ],
    )
    if sess.get_providers()[0] != "RKNNExecutionProvider":
        raise RuntimeError(f"rkort did not use RKNN: {sess.get_providers()}")
    return sess


def _together(sess: Any, feed: dict, callers: int, calls: int) -> tuple[float, list[float]]:
    """``callers`` threads, each making ``calls`` calls of ``sess.run``, started together:
    the wall time from the start to the last return, and every call's latency."""
    latencies: list[list[float]] = [[] for _ in range(callers)]
    start = threading.Barrier(callers + 1)
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        start.wait()
        try:
            for _ in range(calls):
                t = time.perf_counter()
                sess.run(None, feed)
                latencies[i].append(time.perf_counter() - t)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, [x for per in latencies for x in per]


def child_throughput(model: c.Model, rounds: int, block: float) -> dict[str, Any]:
    import rkort

    with tempfile.TemporaryDirectory(prefix="rkort-bench-cache-", dir=".") as cache_dir:
        feed = model.feed()
        sess = _session(model, cache_dir)
        for _ in range(10):
            sess.run(None, feed)
        one_context = c.memory_now()
        t1 = statistics.median(c.time_calls(lambda: sess.run(None, feed), 10, 0))
        calls = max(5, round(block / t1))  # calls per caller in each block
        # Overlapping calls open the second context (a second worker: on a host it builds).
        while len(rkort.session_stats(sess)["contexts"]) < 2:
            _together(sess, feed, 2, 5)
            if rkort.session_stats(sess)["npu_calls"] > 200:
                break
        _together(sess, feed, 2, calls)  # warm the second context
        contexts_open = len(rkort.session_stats(sess)["contexts"])
        two_contexts = c.memory_now()
        mine = c.simulator_workers()
        ref = _session(model, cache_dir, contexts="1")
        for _ in range(5):
            ref.run(None, feed)
        theirs = [pid for pid in c.simulator_workers() if pid not in mine]
        cpus = sorted(os.sched_getaffinity(0))
        # Pinned: each worker (all its threads) on a CPU of its own, as each context is pinned
        # to an NPU core of its own on a board; otherwise each may use every CPU.
        pinned = {pid: {cpus[i % len(cpus)]} for i, pid in enumerate(mine)}
        pinned.update({pid: {cpus[0]} for pid in theirs})
        free = {pid: set(cpus) for pid in pinned}
        runs: dict[str, tuple[Any, int, dict[int, set[int]]]] = {}
        for label, affinity in (("", free), ("pinned ", pinned)):
            runs.update({f"{label}auto:{k}": (sess, k, affinity) for k in CALLERS})
            runs[f"{label}one:2"] = (ref, 2, affinity)
        before = dict(rkort.session_stats(sess)["contexts"])
        rates: dict[str, list[float]] = {k: [] for k in runs}
        lat: dict[str, list[float]] = {k: [] for k in runs}
        cores: dict[str, list[float]] = {k: [] for k in runs}
        order = list(runs)
        for r in range(rounds):
            for key in order[r % len(order) :] + order[: r % len(order)]:
                s, k, affinity = runs[key]
                _pin(affinity)
                cpu = _cpu_seconds()
                wall, latencies = _together(s, feed, k, calls)
                rates[key].append(k * calls / wall)
                lat[key] += latencies
                cores[key].append((_cpu_seconds() - cpu) / wall)
        _pin(free)
        after = rkort.session_stats(sess)["contexts"]
        split = {label: after[label] - before.get(label, 0) for label in after}
        result = {
            "calls_per_block": calls,
            "contexts_open": contexts_open,
            "split": split,
            "rates": rates,
            "latency": {k: statistics.median(v) for k, v in lat.items()},
            "cores": {k: statistics.median(v) for k, v in cores.items()},
            "one_context": one_context,
            "two_contexts": two_contexts,
            "blob_bytes": _blob_sizes(Path(cache_dir)),
            "ref_contexts": len(rkort.session_stats(ref)["contexts"]),
        }
        sess = ref = None
        runs.clear()
        gc.collect()
    return result


def _pin(affinity: dict[int, set[int]]) -> None:
    """Set the CPUs every thread of each worker may run on."""
    for pid, cpus in affinity.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass


def _cpu_seconds() -> float:
    """CPU time used so far by this process and its live simulator workers."""
    import psutil

    total = 0.0
    for pid in [None, *c.simulator_workers()]:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def child_buckets(model: c.Model) -> dict[str, Any]:
    import rkort

    with tempfile.TemporaryDirectory(prefix="rkort-bench-cache-", dir=".") as cache_dir:
        sess = _session(
            model,
            cache_dir,
            buckets=",".join(map(str, BUCKETS)),
            batch_buckets="1",
        )
        steps = [{"live": "session open", **c.memory_now()}]
        base = model.feed()
        for n in LENGTHS:
            feed = {k: v[:, :n] for k, v in base.items()}
            sess.run(None, feed)
            steps.append({"live": f"+ length {n}", **c.memory_now()})
        stats = rkort.session_stats(sess)
        result = {
            "steps": steps,
            "blobs": _blob_sizes(Path(cache_dir)),
            "npu_calls": stats["npu_calls"],
            "cpu_calls": stats["cpu_calls"],
        }
        sess = None
        gc.collect()
    return result


def _blob_sizes(cache: Path) -> dict[str, int]:
    """Each blob in a cache directory (its layout: v1/<xx>/<key>/model.rknn and meta.json), by
    the input shapes its meta.json names."""
    import json

    sizes = {}
    for meta in cache.glob("v1/*/*/meta.json"):
        body = json.loads(meta.read_text())
        shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in body["inputs"].items())
        sizes[shapes] = (meta.parent / "model.rknn").stat().st_size
    return sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    p.add_argument(
        "--block", type=float, default=0.5, help="s of one caller's calls per block (default 0.5)"
    )
    a = p.parse_args()
    me = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="rkort-bench-") as tmp:
        c.private_default_cache(Path(tmp))
        mdir = c.models_dir(Path(tmp) / "models")
        models = [c.bert(mdir), c.mlp(mdir)]
        dynamic = c.bert(mdir, dynamic=True)
        logfile = Path(tmp) / "children.log"
        results = {}
        for m in models:
            c.log(f"{m.name}: 1, 2 and 3 callers on one session, interleaved ...")
            results[m.name] = c.run_child(
                me, "throughput", logfile, model=m, rounds=a.rounds, block=a.block
            )
        c.log(f"{dynamic.name}: memory with buckets {BUCKETS} live ...")
        buckets = c.run_child(me, "buckets", logfile, model=dynamic)

    rows, ctx_rows, mem_rows = [], [], []
    for m in models:
        r = results[m.name]
        rates = {k: statistics.median(v) for k, v in r["rates"].items()}
        label = f"{m.name} ({mib(m.size)} MiB)"
        for key, what in [
            ("auto:1", "1 caller"),
            ("auto:2", "2 callers (threads)"),
            ("auto:3", "3 callers (threads)"),
            ("one:2", "reference: `contexts=1`, 2 callers"),
            ("pinned auto:1", "workers pinned, 1 caller"),
            ("pinned auto:2", "workers pinned, 2 callers"),
            ("pinned auto:3", "workers pinned, 3 callers"),
            ("pinned one:2", "workers pinned, reference: `contexts=1`, 2 callers"),
        ]:
            one = rates["pinned auto:1" if key.startswith("pinned") else "auto:1"]
            rows.append(
                [
                    label,
                    what,
                    f"{rates[key]:.1f}",
                    ms(r["latency"][key]),
                    c.ratio(rates[key], one),
                    f"{r['cores'][key]:.2f}",
                    "/".join(f"{x:.0f}" for x in r["rates"][key]),
                ]
            )
        split = ", ".join(f"{k}: {v}" for k, v in sorted(r["split"].items()))
        ctx_rows.append([m.name, str(r["contexts_open"]), split, c.busy(r)])
        w1, w2 = r["one_context"], r["two_contexts"]
        blob = sum(r["blob_bytes"].values())
        mem_rows.append(
            [
                m.name,
                "1 context",
                mib(w1["rss"]),
                " + ".join(mib(w["rss"]) for w in w1["workers"]),
                mib(w1["rss"] + (w1["worker_rss"] or 0)),
                mib(blob),
            ]
        )
        mem_rows.append(
            [
                m.name,
                "2 contexts",
                mib(w2["rss"]),
                " + ".join(mib(w["rss"]) for w in w2["workers"]),
                mib(w2["rss"] + (w2["worker_rss"] or 0)),
                f"2 x {mib(blob)}",
            ]
        )
    bucket_rows = []
    for step in buckets["steps"]:
        workers = step["worker_rss"] or 0
        bucket_rows.append(
            [
                step["live"],
                mib(step["rss"]),
                str(len(step["workers"])),
                mib(workers),
                mib(step["rss"] + workers),
            ]
        )
    blobs = buckets["blobs"]
    sections = [
        f"One session per model, provider option `contexts` at its default (auto: one context "
        f"per NPU core of {c.TARGET}, at most one per CPU: here {min(3, _cpus())}); on the host "
        "each context is a simulator worker process. Each block: every caller (a thread) makes "
        f"the same number of `run()` calls (about {a.block:g} s of one caller's calls); blocks "
        f"interleaved in {a.rounds} rounds, order rotating. calls/s = calls of all callers / "
        "wall time of the block; the median over the rounds; 'vs 1 caller' against the 1-caller "
        "row of the same kind. 'workers pinned': each worker process (all its threads) may run "
        "on one CPU of its own (the `contexts=1` reference's on the first), as each context "
        "runs on an NPU core of its own on a board; otherwise every worker may use every CPU, "
        "and the simulator runs one call on several threads. 'CPUs busy': CPU time of the "
        "benchmark's process and of the workers over the block's wall time.",
        "### Calls per second, one session\n\n"
        + c.md_table(
            [
                "model",
                "callers",
                "calls/s",
                "median latency ms",
                "vs 1 caller",
                "CPUs busy (user process + workers)",
                "calls/s in each round",
            ],
            rows,
        ),
        "### Contexts the session used\n\n"
        + c.md_table(
            ["model", "contexts open", "calls per context in the timed rounds", "others' CPU"],
            ctx_rows,
        ),
        "### What one more context costs (RSS, MiB)\n\n"
        + c.md_table(
            [
                "model",
                "session",
                "user process",
                "worker(s)",
                "total",
                "on a board: blob(s) loaded",
            ],
            mem_rows,
        )
        + "\n\nOn the host each context is a simulator worker that builds the model itself, so "
        "one more context costs one more worker. On a board each context is an `RKNNLite` "
        "object that loads the blob into the NPU runtime again: rknn-toolkit-lite2's Python "
        "API exposes no weight sharing between contexts (librknnrt's C API has "
        "`rknn_dup_context`; `RKNNLite` does not offer it), so one more context costs one more "
        "blob of NPU memory, which the session's `memory_budget` counts.",
        f"### Memory with {len(BUCKETS)} buckets live: {dynamic.name}, {mib(dynamic.size)} MiB, "
        f"buckets {','.join(map(str, BUCKETS))}, batch bucket 1\n\n"
        + c.md_table(
            ["after", "user process RSS", "workers", "workers RSS", "total RSS"], bucket_rows
        )
        + f"\n\nCalls: {buckets['npu_calls']} on the NPU, {buckets['cpu_calls']} on the CPU. "
        + "Blobs (what a board loads, one per bucket): "
        + ", ".join(f"{k}: {mib(v)} MiB" for k, v in sorted(blobs.items(), key=_by_elements))
        + f"; {mib(sum(blobs.values()))} MiB in all.",
    ]
    c.publish(NAME, "throughput: concurrent callers, contexts and their memory", sections)


def _by_elements(item: tuple[str, int]) -> int:
    """Blobs in order of their input sizes ("input_ids=1x16, ..." texts)."""
    total = 0
    for shape in item[0].split(", "):
        n = 1
        for d in shape.split("=")[1].split("x"):
            n *= int(d)
        total += n
    return total


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    c.main(main, {"throughput": child_throughput, "buckets": child_buckets})
