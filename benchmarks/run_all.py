"""Run every benchmark once, sharing one set of locally built models; about 15 minutes on a
2-core host. Each benchmark prints its table and writes it to benchmarks/results/<name>.md; this
script also writes benchmarks/results/ALL.md (the latest table of each, in order).

    .venv/bin/python benchmarks/run_all.py [--only run_overhead throughput compile cache_lookup placement buckets zoo decoding]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

BENCHMARKS = (
    "run_overhead",
    "throughput",
    "compile",
    "cache_lookup",
    "placement",
    "buckets",
    "zoo",
    "decoding",
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    p.add_argument(
        "--max-wait",
        type=float,
        default=60,
        help="before each benchmark, wait up to this many seconds for other work on the machine "
        "to stop (CPUs < 30%% busy; default 60; 0: do not wait)",
    )
    a = p.parse_args()
    failed = []
    took = {}
    with tempfile.TemporaryDirectory(prefix="rkort-bench-all-") as tmp:
        env = dict(os.environ)
        env[c.MODELS_ENV] = str(Path(tmp) / "models")  # built once, reused by every benchmark
        env["RKORT_CACHE_DIR"] = str(Path(tmp) / "default-cache")  # never the user's cache
        for name in a.only:
            c.log(f"=== {name} ===")
            if a.max_wait > 0:
                c.wait_for_quiet(a.max_wait)
            t = time.perf_counter()
            code = subprocess.call([sys.executable, str(c.HERE / f"{name}.py")], env=env)
            took[name] = time.perf_counter() - t
            if code != 0:
                failed.append(name)
                c.log(f"{name} failed (exit {code})")
    # ALL.md: the latest table of every benchmark (also those not re-run with --only).
    parts = [
        (c.RESULTS / f"{n}.md").read_text() for n in BENCHMARKS if (c.RESULTS / f"{n}.md").exists()
    ]
    if parts:
        (c.RESULTS / "ALL.md").write_text("\n".join(parts))
    c.log(
        "done in "
        + ", ".join(f"{n} {took[n]:.0f} s" for n in a.only)
        + f"; total {sum(took.values()):.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
