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

    .venv/bin/python benchmarks/cache_lookup.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "cache_lookup"
FP16_BLOB_FRACTION = 0.52  # measured fp16 blob size / ONNX size (see compile.md)
WARM_CALLS = 20


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
        getattr(sess, "_close_rknn", lambda: None)()
        del sess
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--skip-small", action="store_true", help="skip the simulator sessions")
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
    c.publish(NAME, "cache_lookup: finding a compiled blob for a large model", sections)


if __name__ == "__main__":
    main()
