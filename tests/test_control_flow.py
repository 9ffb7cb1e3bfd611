"""Control flow on the NPU: an If with a run-time condition runs as one program per branch (the
condition on the CPU), Ifs a signature settles and Loops/Scans of a known length are written out
as dataflow, and what cannot be stays on the CPU with a reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rkort
from rkort.branches import branching
from rkort.cli.inspect import build_report
from rkort.graph import prepare
from tests import models
from tests.conftest import RKNN, needs_rknn
from tests.rehearsal import rehearse_in_process

W = 64
SHAPE = [1, 32, W]


def _matrix(rng: np.random.Generator, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(
        (rng.standard_normal((W, W)) / np.sqrt(W)).astype(np.float32), name
    )


def _save(path: Path, graph: onnx.GraphProto, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def runtime_if(path: Path) -> Path:
    """x [1, 32, 64] and a scalar ``mode``: mode == 1 runs MatMul-Relu-MatMul (with, inside, an
    If on a shape that the signature settles), else MatMul-Sigmoid-MatMul."""
    rng = np.random.default_rng(3)
    out = helper.make_tensor_value_info
    inner = helper.make_node(
        "If",
        ["is32"],
        ["h2"],
        then_branch=helper.make_graph(
            [helper.make_node("Relu", ["h1"], ["r"])],
            "relu",
            [],
            [out("r", TensorProto.FLOAT, SHAPE)],
        ),
        else_branch=helper.make_graph(
            [helper.make_node("Neg", ["h1"], ["n"])],
            "neg",
            [],
            [out("n", TensorProto.FLOAT, SHAPE)],
        ),
    )
    then_branch = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h1"]),
            helper.make_node("Shape", ["h1"], ["s"]),
            helper.make_node("Gather", ["s", "one"], ["len"], axis=0),
            helper.make_node("Equal", ["len", "thirty_two"], ["is32"]),
            inner,
            helper.make_node("MatMul", ["h2", "w2"], ["a"]),
        ],
        "then",
        [],
        [out("a", TensorProto.FLOAT, SHAPE)],
    )
    else_branch = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w3"], ["g1"]),
            helper.make_node("Sigmoid", ["g1"], ["g2"]),
            helper.make_node("MatMul", ["g2", "w4"], ["b"]),
        ],
        "else",
        [],
        [out("b", TensorProto.FLOAT, SHAPE)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Equal", ["mode", "one"], ["cond"], name="is_one"),
            helper.make_node(
                "If",
                ["cond"],
                ["y"],
                then_branch=then_branch,
                else_branch=else_branch,
                name="branch",
            ),
        ],
        "runtime_if",
        [out("x", TensorProto.FLOAT, SHAPE), out("mode", TensorProto.INT64, [])],
        [out("y", TensorProto.FLOAT, SHAPE)],
        [
            *(_matrix(rng, f"w{k}") for k in range(1, 5)),
            numpy_helper.from_array(np.array(1, np.int64), "one"),
            numpy_helper.from_array(np.array(32, np.int64), "thirty_two"),
        ],
    )
    return _save(path, graph)


def scan_model(path: Path) -> Path:
    """x [1, 8, 64] -> Scan over the 8 steps: state = tanh(state @ w + x_t), each state an
    output -> y [8, 1, 64] (scan_output_axes 0) and the last state."""
    rng = np.random.default_rng(5)
    out = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h", "w"], ["hw"]),
            helper.make_node("Add", ["hw", "xt"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_next"]),
            helper.make_node("Identity", ["h_next"], ["emit"]),
        ],
        "step",
        [out("h", TensorProto.FLOAT, [1, W]), out("xt", TensorProto.FLOAT, [1, W])],
        [out("h_next", TensorProto.FLOAT, [1, W]), out("emit", TensorProto.FLOAT, [1, W])],
        [_matrix(rng, "w")],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "Scan",
                ["h0", "x"],
                ["last", "y"],
                body=body,
                num_scan_inputs=1,
                scan_input_axes=[1],
                name="scan",
            )
        ],
        "scan",
        [out("h0", TensorProto.FLOAT, [1, W]), out("x", TensorProto.FLOAT, [1, 8, W])],
        [out("last", TensorProto.FLOAT, [1, W]), out("y", TensorProto.FLOAT, [8, 1, W])],
    )
    return _save(path, graph)


def _session(path: Path, cache: Path, **options: str) -> rkort.InferenceSession:
    return rkort.InferenceSession(
        path, providers=[(RKNN, {"cache_dir": str(cache), **options}), "CPUExecutionProvider"]
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _feed(mode: int, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
    return {"x": x, "mode": np.array(mode, np.int64)}


def test_a_runtime_if_splits_into_branch_programs(tmp_path: Path) -> None:
    path = runtime_if(tmp_path / "if.onnx")
    split = branching(onnx.load(path))
    assert split.ifs == ("branch",) and split.conditions == ("cond",)
    # The If inside a branch tests a shape: one signature settles it, and it is written out.
    branch = _branch(path, True)
    assert [i.name for i in branch.graph.input] == ["x"]  # mode only chose the branch
    prepared, _ = prepare(branch, {"x": tuple(SHAPE)})
    assert [n.op_type for n in prepared.graph.node if n.op_type == "If"] == []
    # A condition computed by the network's own work keeps its If on the CPU, with a reason.
    heavy = branching(onnx.load(models.control_flow(tmp_path).path))
    assert heavy.ifs == () and "computed by the network itself (MatMul)" in heavy.reasons[0]


def _branch(path: Path, take: bool) -> onnx.ModelProto:
    from rkort.branches import branch_model

    model = onnx.load(path)
    return branch_model(model, branching(model), [take])


@needs_rknn
def test_each_branch_runs_on_the_npu(tmp_path: Path) -> None:
    path = runtime_if(tmp_path / "if.onnx")
    ref = ort.InferenceSession(str(path))
    sess = _session(path, tmp_path / "cache")
    for mode in (1, 0, 1, 0):
        feed = _feed(mode, mode)
        got, want = sess.run(None, feed)[0], ref.run(None, feed)[0]
        assert _cosine(got, want) > 0.999, mode
    stats = rkort.session_stats(sess)
    assert stats["npu_calls"] == 4 and stats["cpu_calls"] == 0
    assert stats["compiles"] == 2  # one program per branch, each compiled once
    assert sess.get_providers()[0] == RKNN


@needs_rknn
def test_a_board_runs_the_branches_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = runtime_if(tmp_path / "if.onnx")
    cache = tmp_path / "cache"
    host = _session(path, cache)
    for mode in (0, 1):
        host.run(None, _feed(mode))
    del host
    ref = ort.InferenceSession(str(path))
    with rehearse_in_process("rk3588", tmp_path):
        sess = _session(path, cache)
        for mode in (1, 0):
            feed = _feed(mode, 7)
            assert _cosine(sess.run(None, feed)[0], ref.run(None, feed)[0]) > 0.999
        stats = rkort.session_stats(sess)
    assert stats["npu_calls"] == 2 and stats["compiles"] == 0 and stats["blobs_loaded"] == 2


@needs_rknn
def test_a_constant_if_and_a_counted_loop_are_written_out(tmp_path: Path) -> None:
    """tests.models.control_flow: its If's condition is the network's own (CPU), its Loop runs
    3 times (written out: Tanh x 3 on the NPU)."""
    m = models.control_flow(tmp_path)
    report = build_report(m.path, "rk3588", cache=rkort.cache.Cache(tmp_path / "c"))
    on_cpu = {p["op_type"] for p in report["placements"] if p["device"] == "cpu"}
    assert "Loop" not in on_cpu and "If" in on_cpu
    tanh = [p for p in report["placements"] if p["op_type"] == "Tanh"]
    assert len(tanh) == 3 and {p["device"] for p in tanh} == {"npu"}
    sess = _session(m.path, tmp_path / "cache")
    ref = ort.InferenceSession(str(m.path))
    for seed in (0, 1):
        feed = dict(zip(m.input_names, m.make_feed(seed)))
        for sign in (1, -1):
            signed = {k: v * sign for k, v in feed.items()}
            assert _cosine(sess.run(None, signed)[0], ref.run(None, signed)[0]) > 0.999


@needs_rknn
def test_a_scan_of_known_length_runs_on_the_npu(tmp_path: Path) -> None:
    path = scan_model(tmp_path / "scan.onnx")
    report = build_report(path, "rk3588", cache=rkort.cache.Cache(tmp_path / "c"))
    assert report["npu_flop_share"] == 1.0
    assert {s["device"] for s in report["segments"]} == {"npu"}
    ref = ort.InferenceSession(str(path))
    sess = _session(path, tmp_path / "cache")
    rng = np.random.default_rng(0)
    feed = {
        "h0": rng.standard_normal((1, W)).astype(np.float32),
        "x": rng.standard_normal((1, 8, W)).astype(np.float32),
    }
    for got, want in zip(sess.run(None, feed), ref.run(None, feed)):
        assert got.shape == want.shape and _cosine(got, want) > 0.999
    assert rkort.session_stats(sess)["npu_calls"] == 1


def test_inspect_plans_each_branch_of_a_runtime_if(tmp_path: Path) -> None:
    path = runtime_if(tmp_path / "runtime_if.onnx")
    report = build_report(path, "rk3588", cache=rkort.cache.Cache(tmp_path / "cache"))
    notes = "\n".join(report["notes"])
    assert "decided at run time: sessions run the condition on the CPU" in notes
    assert "branch T: 100.0% of its FLOPs on the NPU" in notes
    assert "branch F: 100.0% of its FLOPs on the NPU" in notes
