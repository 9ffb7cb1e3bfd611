"""What finding a compiled blob costs for a large model, and what a warmed cache saves.

Large model: a BERT-base-sized encoder (hidden 768, 12 layers, random weights, ~415 MiB ONNX).
1. Model content hash: cold (a fresh cache root: the file is read and hashed; with the file evicted
   from the page cache, and with it in the page cache) against warm (a new ``Cache`` object on the
   same root, as a new process would: the memo written by the cold call is used).
2. Opening a session on a warmed cache, split into its parts: onnxruntime's CPU session (rkort's
   session always holds one), reading the graph (``ModelSource.proto``), ``Planner.decide`` (the
   memoized model hash and the program record warmup left: the blob's key), and ``Cache.get``
   (which verifies the blob's sha256). The blob is a stand-in of the fp16 blob's size (52 % of the
   ONNX file, random bytes) put in the cache with ``get_or_build`` during a planner decision (as
   warmup does): the large model is never built on the simulator.
3. For the small BERT-like model, full RKNN sessions on the simulator: empty cache against warmed.
4. Warm open in a board rehearsal (in-process, as tests/rehearsal.py sets it up): both models
   warmed for real with ``rkort warmup``; rkort's part of opening a session on the warmed cache
   (everything but the stand-in's ``init_runtime``, which stands for librknnrt's load and is
   stubbed out) against what rknn-toolkit-lite2's ``RKNNLite()`` + ``load_rknn`` does (read the
   blob file into memory). ONNX parses and onnxruntime sessions are counted. Once more for the
   large model with the stand-in's real ``init_runtime``.
5. Memory of a session the NPU runs whole (the large model, host simulator): RSS of the user
   process against the model's weight bytes, opened on an empty cache (it records the model's
   face) and re-opened on that warmed cache (it opens on the face).

    .venv/bin/python benchmarks/cache_lookup.py [--reps 3] [--skip-small] [--skip-board]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "cache_lookup"
FP16_BLOB_FRACTION = 0.52  # measured fp16 blob size / ONNX size (see compile.md)
WARM_CALLS = 20
OPEN_CHILDREN = 4  # fresh processes per model for the rehearsed warm open
OPEN_REPS = 5  # warm opens (and raw loads) per fresh process


def _evict(path: Path) -> bool:
    """Drop one file's pages from the page cache (no root needed, nothing else is affected)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def _wait_out_racy_window(path: Path, window: float = 2.5) -> None:
    """rkort does not memoize the hash of a file changed in the last 2 s ("racily clean")."""
    st = path.stat()
    age = time.time() - max(st.st_mtime, st.st_ctime)
    if age < window:
        time.sleep(window - age)


def hash_bench(model: c.Model, reps: int, tmp: Path) -> dict[str, Any]:
    from rkort.cache import Cache

    _wait_out_racy_window(model.path)
    cold_disk, cold_mem, warm = [], [], []
    evicted = True
    for rep in range(reps):
        root = tmp / f"hash-{rep}"
        evicted &= _evict(model.path)
        with c.Clock() as t:
            digest = Cache(root / "a").content_hash(model.path)
        cold_disk.append(t.s)
        with c.Clock() as t:
            digest2 = Cache(root / "b").content_hash(model.path)
        cold_mem.append(t.s)
        for _ in range(WARM_CALLS):
            with c.Clock() as t:
                digest3 = Cache(root / "b").content_hash(model.path)
            warm.append(t.s)
        if not digest == digest2 == digest3:
            raise RuntimeError("content hashes differ")
        if not any((root / "b" / "hashes").glob("*.json")):
            raise RuntimeError("the hash was not memoized (the warm numbers would be cold)")
    return {"cold_disk": cold_disk, "cold_mem": cold_mem, "warm": warm, "evicted": evicted}


def open_parts(model: c.Model, reps: int, tmp: Path) -> dict[str, list[float]]:
    import onnxruntime

    import rkort
    from rkort.cache import Cache
    from rkort.model import ModelSource
    from rkort.options import RKNNOptions
    from rkort.parts import blob_meta
    from rkort.planner import Part, Planner

    root = tmp / "open-cache"
    options = RKNNOptions.parse({"target": c.TARGET, "cache_dir": str(root)})
    blob_size = int(model.size * FP16_BLOB_FRACTION)
    signature = {name: shape for name, (shape, _) in model.inputs.items()}

    def stand_in(dest: Path) -> dict[str, Any]:
        with open(dest, "wb") as f:
            left = blob_size
            while left:
                n = min(left, 1 << 24)
                f.write(os.urandom(n))
                left -= n
        return {"stand_in": True}

    # Warm the cache once, as `rkort warmup` does: the decision is recorded and its blob (a
    # stand-in here) put under the real key.
    cache = Cache(root)
    warming = Planner(ModelSource(model.path), options, cache, tmp / "segments")

    def build(part: Part) -> None:
        assert part.spec is not None and part.key is not None
        cache.get_or_build(part.key, stand_in, blob_meta(warming, part.spec))

    decision, _ = warming.decide(signature, build)
    (part,) = decision.npu_parts
    key = part.key

    parts: dict[str, list[float]] = {
        k: [] for k in ("ort_session", "rkort_cpu_session", "proto", "decide", "get", "key_cold")
    }
    for rep in range(reps):
        # onnxruntime's and rkort's CPU sessions, in alternating order.
        for which in ("ort", "rkort") if rep % 2 == 0 else ("rkort", "ort"):
            with c.Clock() as t:
                if which == "ort":
                    onnxruntime.InferenceSession(
                        str(model.path), providers=["CPUExecutionProvider"]
                    )
                else:
                    rkort.InferenceSession(str(model.path), providers=None)
            parts["ort_session" if which == "ort" else "rkort_cpu_session"].append(t.s)
        # The RKNN side of rkort's session open, as a new process would do it.
        src = ModelSource(model.path)
        with c.Clock() as t:
            src.proto  # noqa: B018 - cached property: parses the ONNX file
        parts["proto"].append(t.s)
        with c.Clock() as t:
            found, _ = Planner(ModelSource(model.path), options, Cache(root)).decide(signature)
        parts["decide"].append(t.s)
        if not found.recorded or found.npu_parts[0].key != key:
            raise RuntimeError("the warmed decision was not found")
        with c.Clock() as t:
            entry = Cache(root).get(key)  # type: ignore[arg-type]
        parts["get"].append(t.s)
        if entry is None or entry.size != blob_size:
            raise RuntimeError("the warmed entry was not found")
        # The same lookup in a cache that never saw the model (content hash not memoized).
        with c.Clock() as t:
            cold = Planner(src, options, Cache(tmp / f"cold-{rep}")).model_hash
        parts["key_cold"].append(t.s)
        if not cold:
            raise RuntimeError("no model hash")
    parts["blob_size"] = [blob_size]
    return parts


def small_sessions(model: c.Model, tmp: Path) -> dict[str, Any]:
    """Full RKNN sessions (simulator worker) for the small model: empty cache, then warmed."""
    import rkort

    root = tmp / "small-cache"
    out: dict[str, Any] = {}
    for label in ("empty", "warmed", "warmed again"):
        t0 = time.perf_counter()
        sess = rkort.InferenceSession(
            str(model.path),
            providers=["RKNNExecutionProvider", "CPUExecutionProvider"],
            provider_options=[{"cache_dir": str(root), "fallback": "0", "progress": "0"}, {}],
        )
        out[label] = time.perf_counter() - t0
        if sess.get_providers()[0] != "RKNNExecutionProvider":
            raise RuntimeError(f"rkort did not use RKNN: {sess.get_providers()}")
        sess = None  # closes its worker
        gc.collect()
    return out


# ---------------------------------------------------------------------------------------------
# Warm opens and memory (children: each in a fresh process)


class Counts:
    """ONNX files parsed (``onnx.load`` and its forms) and onnxruntime sessions created (what
    each was created from, and how long it took) in this process, from now on."""

    def __init__(self) -> None:
        import onnx
        import onnxruntime.capi._pybind_state as C

        self.parses: list[str] = []
        self.sessions: list[dict[str, Any]] = []
        counts = self
        for name in ("load", "load_model", "load_from_string", "load_model_from_string"):
            original = getattr(onnx, name)

            def parse(*args: Any, _original: Callable[..., Any] = original, **kw: Any) -> Any:
                what = args[0] if args else kw.get("f", kw.get("s"))
                counts.parses.append(
                    f"{len(what)} bytes" if isinstance(what, bytes) else Path(str(what)).name
                )
                return _original(*args, **kw)

            setattr(onnx, name, parse)

        class Session(C.InferenceSession):  # type: ignore[misc,name-defined]
            def __init__(self, options: Any, model: Any, *args: Any) -> None:
                t = time.perf_counter()
                super().__init__(options, model, *args)
                counts.sessions.append(
                    {
                        "from": f"{len(model)} bytes"
                        if isinstance(model, bytes)
                        else Path(str(model)).name,
                        "bytes": len(model) if isinstance(model, bytes) else None,
                        "s": time.perf_counter() - t,
                    }
                )
                self._counted = counts.sessions[-1]

            def initialize_session(self, *args: Any) -> Any:
                t = time.perf_counter()
                try:
                    return super().initialize_session(*args)
                finally:
                    self._counted["s"] += time.perf_counter() - t

        C.InferenceSession = Session

    def reset(self) -> None:
        self.parses.clear()
        self.sessions.clear()

    def whole_model_sessions(self, model: c.Model) -> int:
        """onnxruntime sessions of the whole model (its file, or bytes of a MiB or more)."""
        return sum(
            1 for s in self.sessions if s["from"] == model.path.name or (s["bytes"] or 0) >= 2**20
        )


def _rknn_session(model: c.Model, cache_dir: str) -> Any:
    import rkort

    sess = rkort.InferenceSession(
        str(model.path),
        providers=["RKNNExecutionProvider", "CPUExecutionProvider"],
        provider_options=[{"cache_dir": cache_dir, "fallback": "0", "progress": "0"}, {}],
    )
    if sess.get_providers()[0] != "RKNNExecutionProvider":
        raise RuntimeError(f"rkort did not use RKNN: {sess.get_providers()}")
    return sess


def child_open_memory(model: c.Model, cache_dir: str) -> dict[str, Any]:
    """A session of ``model`` on the host simulator, alone in this process: open, one call, then
    RSS of this process and of its worker, and what was parsed."""
    counts = Counts()
    import rkort

    feed = model.feed()
    with c.Clock() as t:
        sess = _rknn_session(model, cache_dir)
    sess.run(None, feed)
    result = {
        "open": t.s,
        **c.memory_now(),
        "parses": list(counts.parses),
        "sessions": list(counts.sessions),
        "whole_model_sessions": counts.whole_model_sessions(model),
        "stats": rkort.session_stats(sess),
    }
    sess = None
    gc.collect()
    return result


def _rehearsed(
    model: c.Model, real_init: bool
) -> tuple[Counts, Any, dict[str, list[float]], Callable[[], None]]:
    """This process as a rehearsed rk3588 board (tests/rehearsal.py), the stand-in's ``load_rknn``
    and ``init_runtime`` timed (``init_runtime`` stubbed out unless ``real_init``)."""
    counts = Counts()
    import rkort  # noqa: F401 - imported before any timing, on both sides
    from tests.rehearsal import rehearse_in_process

    board = tempfile.mkdtemp(prefix="rkort-bench-board-", dir=".")
    rehearsal = rehearse_in_process(c.TARGET, Path(board))
    rehearsal.__enter__()
    from rknnlite.api import RKNNLite

    timers: dict[str, list[float]] = {"load_rknn": [], "init_runtime": []}
    load, init = RKNNLite.load_rknn, RKNNLite.init_runtime

    def timed_load(self: Any, *args: Any, **kw: Any) -> int:
        t = time.perf_counter()
        try:
            return load(self, *args, **kw)
        finally:
            timers["load_rknn"].append(time.perf_counter() - t)

    def timed_init(self: Any, *args: Any, **kw: Any) -> int:
        t = time.perf_counter()
        try:
            return init(self, *args, **kw) if real_init else 0
        finally:
            timers["init_runtime"].append(time.perf_counter() - t)

    RKNNLite.load_rknn, RKNNLite.init_runtime = timed_load, timed_init

    def leave() -> None:
        RKNNLite.load_rknn, RKNNLite.init_runtime = load, init
        rehearsal.__exit__(None, None, None)

    return counts, RKNNLite, timers, leave


def child_rehearsal_open(
    model: c.Model, cache_dir: str, blob: str, reps: int, rkort_first: bool
) -> dict[str, Any]:
    """In a rehearsed board: ``reps`` warm opens of a session (init_runtime stubbed out) and raw
    loads of its blob, alternating; which comes first in this fresh process is ``rkort_first``."""
    counts, RKNNLite, timers, leave = _rehearsed(model, real_init=False)
    out: dict[str, list[Any]] = {"rkort": [], "raw": []}

    def rkort_open() -> None:
        counts.reset()
        timers["load_rknn"].clear()
        timers["init_runtime"].clear()
        with c.Clock() as t:
            sess = _rknn_session(model, cache_dir)
        out["rkort"].append(
            {
                "total": t.s,
                "load_rknn": sum(timers["load_rknn"]),
                "init_runtime": sum(timers["init_runtime"]),
                "ort": sum(s["s"] for s in counts.sessions),
                "parses": len(counts.parses),
                "sessions": [s["from"] for s in counts.sessions],
                "whole_model_sessions": counts.whole_model_sessions(model),
                "blobs_loaded": _stats(sess)["blobs_loaded"],
            }
        )
        del sess
        gc.collect()

    def raw_load() -> None:
        with c.Clock() as t:
            lite = RKNNLite(verbose=False)
            if lite.load_rknn(blob) != 0:
                raise RuntimeError(f"load_rknn({blob}) failed")
        out["raw"].append({"total": t.s})
        lite.release()
        del lite
        gc.collect()

    order = [rkort_open, raw_load] if rkort_first else [raw_load, rkort_open]
    for _ in range(reps):
        for fn in order:
            fn()
    leave()
    return out


def child_rehearsal_real(model: c.Model, cache_dir: str) -> dict[str, Any]:
    """One warm open in a rehearsed board with the stand-in's real init_runtime (the simulator
    builds the model again in a worker), one call, and the cosine to onnxruntime's output."""
    counts, _, timers, leave = _rehearsed(model, real_init=True)
    feed = model.feed()
    with c.Clock() as t:
        sess = _rknn_session(model, cache_dir)
    out = sess.run(None, feed)[0]
    result = {
        "total": t.s,
        "load_rknn": sum(timers["load_rknn"]),
        "init_runtime": sum(timers["init_runtime"]),
        "parses": len(counts.parses),
        "whole_model_sessions": counts.whole_model_sessions(model),
        "stats": _stats(sess),
    }
    sess = None
    gc.collect()
    leave()
    import onnxruntime

    ref = onnxruntime.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    result["cosine"] = c.cosine(out, ref.run(None, feed)[0])
    return result


def _stats(sess: Any) -> dict[str, Any]:
    import rkort

    return rkort.session_stats(sess)


def warmup(model: c.Model, cache_dir: Path, log_path: Path) -> tuple[float, Path]:
    """``rkort warmup`` of ``model`` into ``cache_dir`` (a child process); its time and blob."""
    with open(log_path, "ab") as logf, c.Clock() as t:
        subprocess.run(
            [sys.executable, "-m", "rkort", "warmup", str(model.path), "--target", c.TARGET]
            + ["--cache-dir", str(cache_dir), "-q"],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            check=True,
        )
    import json

    for meta in cache_dir.glob("v1/*/*/meta.json"):
        if Path(json.loads(meta.read_text())["model"]) == model.path:
            return t.s, meta.parent / "model.rknn"
    raise RuntimeError(f"rkort warmup left no blob of {model.path.name} in {cache_dir}")


def weight_bytes(model: c.Model) -> int:
    """Bytes of the model's initializers (its weights)."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(model.path), load_external_data=False)
    total = 0
    for t in proto.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def board_opens(
    models: list[c.Model], tmp: Path, log_path: Path, real_init: bool
) -> dict[str, Any]:
    me = Path(__file__).resolve()
    out: dict[str, Any] = {}
    env = c.compiled_env(tmp / "pycache")
    for m in models:
        cache = tmp / f"warmed-{m.path.stem}"
        c.log(f"rkort warmup {m.path.name} (a real build) ...")
        took, blob = warmup(m, cache, log_path)
        # A board's cache was written a while before it opens: a file changed in the last 2 s
        # is "racily clean" and hashed again rather than trusted to its memo.
        _wait_out_racy_window(blob, 3.0)
        runs = []
        for i in range(OPEN_CHILDREN):
            c.log(f"{m.name}: rehearsed warm opens and raw loads, fresh process {i + 1} ...")
            runs.append(
                c.run_child(
                    me,
                    "rehearsal-open",
                    log_path,
                    env=env,
                    model=m,
                    cache_dir=str(cache),
                    blob=str(blob),
                    reps=OPEN_REPS,
                    rkort_first=i % 2 == 0,
                )
            )
        real = None
        if real_init and m is models[-1]:
            c.log(f"{m.name}: one rehearsed warm open with the stand-in's real init_runtime ...")
            real = c.run_child(
                me, "rehearsal-real", log_path, env=env, model=m, cache_dir=str(cache)
            )
        out[m.name] = {"warmup": took, "blob": blob.stat().st_size, "runs": runs, "real": real}
    return out


def host_memory(model: c.Model, tmp: Path, log_path: Path) -> dict[str, Any]:
    me = Path(__file__).resolve()
    cache = tmp / "memory-cache"
    out = {}
    for label in ("empty cache", "warmed cache"):
        c.log(f"{model.name}: RKNN session on the host simulator, {label}, alone ...")
        out[label] = c.run_child(
            me, "open-memory", log_path, timeout=1800, model=model, cache_dir=str(cache)
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--skip-small", action="store_true", help="skip the simulator sessions")
    p.add_argument(
        "--skip-board", action="store_true", help="skip the warm opens in a board rehearsal"
    )
    p.add_argument(
        "--skip-real-init",
        action="store_true",
        help="skip the rehearsed open with the stand-in's real init_runtime (a ~40 s rebuild)",
    )
    p.add_argument(
        "--skip-memory", action="store_true", help="skip the large model's session memory"
    )
    a = p.parse_args()
    med = statistics.median
    with tempfile.TemporaryDirectory(prefix="rkort-bench-") as tmpdir:
        tmp = Path(tmpdir)
        c.private_default_cache(tmp)
        mdir = c.models_dir(tmp / "models")
        large = c.bert(mdir, hidden=768, layers=12)
        small = c.bert(mdir)
        c.log(f"hashing {large.path.name} ({c.mib(large.size)} MiB), cold and warm ...")
        h = hash_bench(large, a.reps, tmp)
        c.log("session-open parts on a warmed cache ...")
        o = open_parts(large, a.reps, tmp)
        s = None
        if not a.skip_small:
            c.log(f"full RKNN sessions of {small.name}: empty cache, then warmed ...")
            s = small_sessions(small, tmp)
        logfile = tmp / "children.log"
        board = None
        if not a.skip_board:
            board = board_opens([small, large], tmp, logfile, not a.skip_real_init)
        memory = None
        weights = weight_bytes(large)
        if not a.skip_memory:
            memory = host_memory(large, tmp, logfile)

    mb = large.size / 2**20
    cd, cm, w = med(h["cold_disk"]), med(h["cold_mem"]), med(h["warm"])
    hash_rows = [
        [
            "cold: not memoized, file evicted from the page cache"
            if h["evicted"]
            else "cold: not memoized (page cache could not be evicted)",
            c.ms(cd),
            f"{mb / cd:.0f}",
            "1.00x",
            "",
        ],
        [
            "cold: not memoized, file in the page cache",
            c.ms(cm),
            f"{mb / cm:.0f}",
            c.ratio(cm, cd),
            "1.00x",
        ],
        [
            "warm: memoized, new `Cache` on the same root",
            c.ms(w),
            "",
            c.ratio(w, cd),
            c.ratio(w, cm),
        ],
    ]
    P = {k: med(v) for k, v in o.items()}
    rkort_rknn_parts = P["decide"] + P["get"]
    warm_total = P["ort_session"] + rkort_rknn_parts
    cold_total = P["ort_session"] + P["proto"] + P["key_cold"]
    open_rows = [
        ["onnxruntime `InferenceSession` (CPU)", c.ms(P["ort_session"]), "1.00x"],
        [
            "rkort `InferenceSession(providers=None)`",
            c.ms(P["rkort_cpu_session"]),
            c.ratio(P["rkort_cpu_session"], P["ort_session"]),
        ],
        [
            "rkort RKNN: `ModelSource.proto` (onnx.load, no external data)",
            c.ms(P["proto"]),
            c.ratio(P["proto"], P["ort_session"]),
        ],
        [
            "rkort RKNN: `Planner.decide` (memoized model hash + the program record)",
            c.ms(P["decide"]),
            c.ratio(P["decide"], P["ort_session"]),
        ],
        [
            f"rkort RKNN: `Cache.get` (verifies the {c.mib(P['blob_size'])} MiB blob's sha256)",
            c.ms(P["get"]),
            c.ratio(P["get"], P["ort_session"]),
        ],
        [
            "**warmed-cache open before the backend starts** (ORT + decide + get; no graph read)",
            c.ms(warm_total),
            c.ratio(warm_total, P["ort_session"]),
        ],
    ]
    warm_cold_rows = [
        ["model hash (first `content_hash`)", c.ms(cm), c.ms(w), c.ratio(w, cm)],
        [
            "finding the blob's key: cold = graph + model hash (then planning and a build); "
            "warm = `Planner.decide` from the record",
            c.ms(P["proto"] + P["key_cold"]),
            c.ms(P["decide"]),
            c.ratio(P["decide"], P["proto"] + P["key_cold"]),
        ],
        [
            "open up to the backend: cold = ORT + proto + hash (then planning and a build); "
            "warm = ORT + decide + `Cache.get`",
            c.ms(cold_total),
            c.ms(warm_total),
            c.ratio(warm_total, cold_total),
        ],
    ]
    sections = [
        f"Large model: {large.name}, {c.mib(large.size)} MiB ONNX (single file). "
        f"Medians over {a.reps} reps ({a.reps * WARM_CALLS} calls for the warm hash).",
        "### Model content hash\n\n"
        + c.md_table(
            ["what", "ms", "MiB/s", "ratio vs evicted", "ratio vs page-cached"], hash_rows
        ),
        "### Session open on a warmed cache, by part\n\n"
        + c.md_table(["part", "ms", "ratio vs ORT session"], open_rows),
        "### Warm vs cold (cold = a cache root that never saw the model)\n\n"
        + c.md_table(["what", "cold ms", "warm ms", "warm/cold"], warm_cold_rows),
    ]
    if s is not None:
        sections.append(
            f"### Full RKNN session open on the host simulator, {small.name} "
            f"({c.mib(small.size)} MiB)\n\n"
            + c.md_table(
                ["cache", "open s", "ratio vs empty"],
                [[k, c.secs(v), c.ratio(v, s["empty"])] for k, v in s.items()],
            )
            + "\n\nOn a host the simulator only runs what it built in the same process, so a "
            "warmed cache cannot skip the build here; it serves `rkort warmup` and boards."
        )
    if board is not None:
        sections += _board_sections(board, [small, large])
    if memory is not None:
        sections.append(_memory_section(memory, large, weights))
    c.publish(NAME, "cache_lookup: finding a compiled blob for a large model", sections)


def _board_sections(board: dict[str, Any], models: list[c.Model]) -> list[str]:
    med = statistics.median
    rows, parts_rows, read_rows, real_rows = [], [], [], []
    for m in models:
        b = board[m.name]
        runs = b["runs"]
        first = {k: med(r[k][0]["total"] for r in runs) for k in ("raw", "rkort")}
        again = {k: med(x["total"] for r in runs for x in r[k][1:]) for k in ("raw", "rkort")}
        rk = [x for r in runs for x in r["rkort"]]
        rk_first = [r["rkort"][0] for r in runs]
        label = f"{m.name} ({c.mib(m.size)} MiB ONNX, {c.mib(b['blob'])} MiB blob)"
        rows += c.pair_rows(
            [label],
            c.Side(
                "rknn-toolkit-lite2: `RKNNLite()` + `load_rknn()` (reads the blob)",
                [first["raw"], again["raw"]],
            ),
            c.Side(
                "rkort: session open on the warmed cache, all but `init_runtime`",
                [first["rkort"], again["rkort"]],
            ),
        )

        def part(key: str, xs: list[dict[str, Any]]) -> float:
            return med(x[key] for x in xs)

        def rest(xs: list[dict[str, Any]]) -> float:
            return med(x["total"] - x["load_rknn"] - x["ort"] for x in xs)

        for what, f, r in [
            (
                "`load_rknn()` inside rkort's open (the blob read)",
                part("load_rknn", rk_first),
                part("load_rknn", rk),
            ),
            ("onnxruntime session on the model's face", part("ort", rk_first), part("ort", rk)),
            (
                "the rest: model hash memo, face and program records, blob verification memo, "
                "planner, engine",
                rest(rk_first),
                rest(rk),
            ),
        ]:
            parts_rows.append([m.name, what, c.ms(f), c.ms(r)])

        def made(xs: list[dict[str, Any]]) -> str:
            return "; ".join(sorted({", ".join(x["sessions"]) or "none" for x in xs}))

        rk_again = [x for r in runs for x in r["rkort"][1:]]
        read_rows.append(
            [
                m.name,
                c.mib(m.size),
                str(max(x["parses"] for x in rk)),
                f"first open: {made(rk_first)}; again: {made(rk_again)}",
                str(max(x["whole_model_sessions"] for x in rk)),
                str(max(x["blobs_loaded"] for x in rk)),
                c.ms(med(x["total"] - x["load_rknn"] for x in rk)),
                c.secs(b["warmup"]),
            ]
        )
        real = b.get("real")
        if real is not None:
            real_rows.append(
                [
                    m.name,
                    c.secs(real["total"]),
                    c.secs(real["init_runtime"]),
                    c.ms(real["total"] - real["init_runtime"]),
                    c.ms(real["load_rknn"]),
                    str(real["parses"]),
                    str(real["whole_model_sessions"]),
                    f"{real['stats']['npu_calls']} NPU, {real['stats']['cpu_calls']} CPU",
                    f"{real['cosine']:.6f}",
                    c.busy(real),
                ]
            )
    busy = ", ".join(
        f"{m.name}: " + "/".join(c.busy(r) for r in board[m.name]["runs"]) for m in models
    )
    out = [
        f"### Warm open in a board rehearsal ({c.TARGET}, in-process), blobs built by "
        "`rkort warmup`\n\n"
        f"{OPEN_CHILDREN} fresh processes per model, each with {OPEN_REPS} session opens and "
        f"{OPEN_REPS} raw loads alternating (which comes first alternates between processes); "
        "`rkort` and `rknnlite` imported before any timing; blobs in the page cache. The "
        "stand-in's `init_runtime` (it stands for librknnrt's load, the same on both sides) is "
        "stubbed out: what is timed is rkort's part of the open. 'first': the first of each in "
        "a fresh process (median over the processes); 'again': the others (median).\n\n"
        + c.md_table(["model", "what", "first ms", "again ms", "first ratio", "again ratio"], rows)
        + f"\n\nOther work's CPU share during each process: {busy}.",
        "### Where rkort's warm open goes (medians, ms)\n\n"
        + c.md_table(["model", "part", "first ms", "again ms"], parts_rows),
        "### What a warm open reads\n\n"
        + c.md_table(
            [
                "model",
                "ONNX MiB",
                "ONNX parses (`onnx.load`...)",
                "onnxruntime sessions created, from",
                "whole-model onnxruntime sessions",
                "blobs loaded",
                "open minus the blob read, ms",
                "`rkort warmup` s",
            ],
            read_rows,
        )
        + "\n\nThe ONNX file is not parsed: onnxruntime loads the model's face (a few hundred "
        "bytes: its inputs, outputs and metadata) instead of the model, and what is left besides "
        "the blob read does not grow with the model's size. Sessions of the same model opened "
        "without session options of their own share the first one's face session, so a later "
        "open creates no onnxruntime session; the first open in a process pays for "
        "onnxruntime's first session there (its part is in 'onnxruntime session on the model's "
        "face', construction and initialization).",
    ]
    if real_rows:
        out.append(
            "### The same warm open with the stand-in's real `init_runtime`\n\n"
            + c.md_table(
                [
                    "model",
                    "open s",
                    "`init_runtime` s (stand-in: the simulator rebuilds the model)",
                    "rkort's part ms",
                    "`load_rknn` ms",
                    "ONNX parses",
                    "whole-model onnxruntime sessions",
                    "calls",
                    "cosine to onnxruntime",
                    "others' CPU",
                ],
                real_rows,
            )
            + "\n\nOn a board `init_runtime` is librknnrt loading the blob onto the NPU (not "
            "measured here); the stand-in instead has the simulator build the model again."
        )
    return out


def _memory_section(memory: dict[str, Any], model: c.Model, weights: int) -> str:
    rows = []
    for label, r in memory.items():
        sessions = ", ".join(s["from"] for s in r["sessions"]) or "none"
        rows.append(
            [
                label,
                c.secs(r["open"]),
                c.mib(r["rss"]),
                f"{r['rss'] / weights:.2f}x",
                c.mib(r["peak"]),
                f"{r['peak'] / weights:.2f}x",
                c.mib(r["worker_rss"] or 0),
                str(len(r["parses"])),
                sessions,
                str(r["whole_model_sessions"]),
                c.busy(r),
            ]
        )
    return (
        f"### Memory of a session the NPU runs whole: {model.name}, "
        f"{c.mib(weights)} MiB of weights, host simulator\n\n"
        "Each open alone in a fresh process, then one call; the user process's RSS (current, "
        "and its peak VmHWM) against the model's weight bytes. The blob lives in the simulator "
        "worker. The first open (an empty cache) plans from the parsed model and records its "
        "face; the second opens on that face.\n\n"
        + c.md_table(
            [
                "opened on",
                "open s",
                "user RSS MiB",
                "RSS / weights",
                "user peak MiB",
                "peak / weights",
                "worker RSS MiB",
                "ONNX parses (user process)",
                "onnxruntime sessions, from",
                "whole-model onnxruntime sessions",
                "others' CPU",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    c.main(
        main,
        {
            "open-memory": child_open_memory,
            "rehearsal-open": child_rehearsal_open,
            "rehearsal-real": child_rehearsal_real,
        },
    )
