"""The benchmarks' shared helpers (benchmarks/_common.py): the "baseline vs rkort" rows, the
interleaved timing, the JSON child plumbing and finding a session's simulator workers. The
benchmarks themselves are measurements and are not run here."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import _common as c  # noqa: E402


def test_pair_rows_format_figures_and_ratios() -> None:
    rows = c.pair_rows(
        ["MLP"],
        c.Side("raw", [0.002, 0.004, "-"], ["1%"]),
        c.Side("rkort", [0.003, None, "text"], ["2%"]),
    )
    assert rows == [
        ["MLP", "raw", "2.00", "4.00", "-", "1.00x", "1.00x", "1%"],
        ["MLP", "rkort", "3.00", "n/a", "text", "1.50x", "n/a", "2%"],
    ]
    (base, other) = c.pair_rows([], c.Side("a", [2.0]), c.Side("b", [1.0]), fmt=str, ratios=(0,))
    assert base == ["a", "2.0", "1.00x"] and other == ["b", "1.0", "0.50x"]


def test_interleave_times_every_runner_in_rounds() -> None:
    calls: list[str] = []
    runners = {
        "a": lambda: calls.append("a"),
        "b": c.Idled(lambda: calls.append("b"), 0.0001),
    }
    samples = c.interleave(runners, calls=8, warmup=1, rounds=4)
    assert {k: len(v) for k, v in samples.items()} == {"a": 8, "b": 8}
    assert calls[:2] == ["a", "b"]  # the warm-up calls
    # rounds alternate their order: a,a,b,b then b,b,a,a ...
    assert calls[2:10] == ["a", "a", "b", "b", "b", "b", "a", "a"]
    assert c.cosine([1, 0], [1, 0]) == pytest.approx(1.0)
    assert c.cosine([1, 0], [0, 2]) == pytest.approx(0.0)


def test_model_travels_to_a_child_and_the_result_back(tmp_path: Path) -> None:
    script = tmp_path / "bench.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(BENCHMARKS)!r})
            import _common as c

            def child(model, n):
                print("noise that goes to the log")
                return {{"name": model.name, "shape": model.inputs["x"][0], "n": n}}

            c.main(lambda: 0, {{"echo": child}})
            """
        )
    )
    model = c.Model("M", tmp_path / "m.onnx", {"x": ((1, 4), "float32")}, ("y",))
    log = tmp_path / "child.log"
    result = c.run_child(script, "echo", log, model=model, n=3)
    assert result["name"] == "M" and result["shape"] == [1, 4] and result["n"] == 3
    assert 0.0 <= result["_others_cpu"] <= 1.0
    assert "noise" in log.read_text()
    assert c.Model.from_json(model.as_json()) == model
    with pytest.raises(RuntimeError, match="failed"):
        c.run_child(script, "echo", log, model=model)  # n missing: the child fails


def test_simulator_workers_are_children_serving_a_model() -> None:
    from rkort.toolkit.protocol import CHILD_MODULE

    # Stand-ins with a worker's command line (python -m rkort.toolkit.child serve FD), and one
    # child that is not a worker.
    sleep = "import time; time.sleep(30)"
    worker = subprocess.Popen([sys.executable, "-c", sleep, "-m", CHILD_MODULE, "serve", "5"])
    other = subprocess.Popen([sys.executable, "-c", sleep, "-m", CHILD_MODULE, "compile", "5"])
    try:
        deadline = time.monotonic() + 10
        while worker.pid not in c.simulator_workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.simulator_workers() == [worker.pid]
        figures = c.memory_now()
        assert [w["pid"] for w in figures["workers"]] == [worker.pid]
        assert figures["worker_rss"] > 0 and figures["rss"] > 0 and figures["peak"] > 0
    finally:
        for p in (worker, other):
            p.kill()
            p.wait()
