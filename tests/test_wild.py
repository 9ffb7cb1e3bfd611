"""Models from the wild: no exception but onnxruntime's leaves run(), inputs of every rank (0-d
too) and dtype, optional inputs, numbers that cannot be trusted recomputed on the CPU, and
RunOptions honoured on RKNN."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rkort
from rkort.capi.onnxruntime_pybind11_state import EPFail, Fail
from rkort.engine import RKNNEngine
from tests.conftest import RKNN, needs_rknn

pytestmark = needs_rknn


def _model(path: Path, nodes, inputs, outputs, inits=()) -> Path:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _mlp(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) / 4, "w")
    return _model(
        path,
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [w],
    )


def _session(path: Path, cache: Path, **options: str) -> rkort.InferenceSession:
    return rkort.InferenceSession(
        path, providers=[(RKNN, {"cache_dir": str(cache), **options}), "CPUExecutionProvider"]
    )


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)


def test_a_scalar_input_keeps_its_rank(tmp_path: Path) -> None:
    """silero-vad's case: a 0-d input crashed the app (numpy made it 1-d)."""
    path = _model(
        tmp_path / "scale.onnx",
        [helper.make_node("Mul", ["x", "s"], ["y"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
    )
    sess = _session(path, tmp_path / "cache")
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    for s in (np.float32(0.5), np.array(2.0, np.float32)):
        np.testing.assert_allclose(
            sess.run(None, {"x": x, "s": np.asarray(s)})[0], x * s, rtol=1e-3
        )
    assert rkort.session_stats(sess)["npu_calls"] == 2


def test_inputs_of_every_dtype(tmp_path: Path) -> None:
    kinds = {
        "f32": (TensorProto.FLOAT, np.float32),
        "f16": (TensorProto.FLOAT16, np.float16),
        "f64": (TensorProto.DOUBLE, np.float64),
        "i8": (TensorProto.INT8, np.int8),
        "u8": (TensorProto.UINT8, np.uint8),
        "i16": (TensorProto.INT16, np.int16),
        "i32": (TensorProto.INT32, np.int32),
        "i64": (TensorProto.INT64, np.int64),
        "b": (TensorProto.BOOL, np.bool_),
    }
    nodes = [helper.make_node("Cast", [n], [f"{n}_f"], to=TensorProto.FLOAT) for n in kinds]
    nodes.append(helper.make_node("Sum", [f"{n}_f" for n in kinds], ["y"]))
    path = _model(
        tmp_path / "dtypes.onnx",
        nodes,
        [helper.make_tensor_value_info(n, t, [1, 8]) for n, (t, _) in kinds.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    rng = np.random.default_rng(1)
    feed = {n: (rng.integers(0, 2, (1, 8)) * 3).astype(dt) for n, (_, dt) in kinds.items()}
    want = ort.InferenceSession(str(path)).run(None, feed)[0]
    sess = _session(path, tmp_path / "cache")
    np.testing.assert_allclose(sess.run(None, feed)[0], want, rtol=1e-3)
    stats = rkort.session_stats(sess)
    assert stats["npu_calls"] + stats["cpu_calls"] == 1


def test_an_optional_input_fed_or_not(tmp_path: Path) -> None:
    """A graph input with an initializer: onnxruntime lets a feed override it."""
    path = tmp_path / "bias.onnx"
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "bias",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 16]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(np.ones((1, 16), np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    ref = ort.InferenceSession(str(path))
    sess = _session(path, tmp_path / "cache")
    x = _x()
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref.run(None, {"x": x})[0], rtol=1e-3)
    given = {"x": x, "bias": np.full((1, 16), 5.0, np.float32)}
    np.testing.assert_allclose(sess.run(None, given)[0], ref.run(None, given)[0], rtol=1e-3)
    stats = rkort.session_stats(sess)
    assert stats["npu_calls"] + stats["cpu_calls"] == 2 and stats["npu_calls"] >= 1


def test_an_unexpected_failure_is_answered_by_onnxruntime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = _mlp(tmp_path / "mlp.onnx")
    ref = ort.InferenceSession(str(path))
    monkeypatch.delenv("RKORT_STRICT")  # as a user runs it
    sess = _session(path, tmp_path / "cache")

    def broken(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise ValueError("a bug inside rkort")

    monkeypatch.setattr(RKNNEngine, "run", broken)
    with caplog.at_level(logging.WARNING, logger="rkort"):
        for seed in (0, 1):
            got = sess.run(None, {"x": _x(seed)})[0]
            np.testing.assert_array_equal(got, ref.run(None, {"x": _x(seed)})[0])
    warnings = [r for r in caplog.records if "a bug inside rkort" in r.getMessage()]
    assert len(warnings) == 1 and "please report" in warnings[0].getMessage()
    stats = rkort.session_stats(sess)
    assert stats["cpu_calls"] == 2
    (reason,) = stats["cpu_reasons"]
    assert "unexpected failure" in reason and "ValueError" in reason
    # onnxruntime's own errors still reach the app as they are.
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument):
        sess.run(None, {"x": _x().astype(np.float64)})
    # With fallback=0 the app asked to know: EPFail.
    strict = _session(path, tmp_path / "cache", fallback="0")
    with pytest.raises(EPFail, match="a bug inside rkort"):
        strict.run(None, {"x": _x()})


def test_the_test_suite_runs_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sess = _session(_mlp(tmp_path / "mlp.onnx"), tmp_path / "cache")

    def broken(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise ValueError("a bug inside rkort")

    monkeypatch.setattr(RKNNEngine, "run", broken)
    with pytest.raises(ValueError, match="a bug inside rkort"):
        sess.run(None, {"x": _x()})


def test_inf_from_float16_is_recomputed_on_the_cpu(tmp_path: Path) -> None:
    """An intermediate beyond float16's range (the result is finite in float32). Exp overflows:
    the simulator spins for ever on a MatMul whose products overflow, so the test avoids one."""
    path = _model(
        tmp_path / "overflow.onnx",
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Exp", ["h"], ["e"]),
            helper.make_node("Mul", ["e", "s"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [
            numpy_helper.from_array(np.eye(64, dtype=np.float32), "w"),
            numpy_helper.from_array(np.array([1e-3], np.float32), "s"),
        ],
    )
    x = np.linspace(0, 14, 64, dtype=np.float32)[None]
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert np.isfinite(want).all() and want.max() > 65504 * 1e-3
    sess = _session(path, tmp_path / "cache")
    got = sess.run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    stats = rkort.session_stats(sess)
    assert stats["cpu_calls"] == 1
    assert any("inf or NaN" in r for r in stats["cpu_reasons"])
    # A call within float16's range stays on the NPU.
    small = x / 4
    np.testing.assert_allclose(
        sess.run(None, {"x": small})[0],
        ort.InferenceSession(str(path)).run(None, {"x": small})[0],
        rtol=2e-2,
    )
    assert rkort.session_stats(sess)["npu_calls"] == 1


def test_run_options_terminate_as_onnxruntime(tmp_path: Path) -> None:
    path = _mlp(tmp_path / "mlp.onnx")
    opts = ort.RunOptions()
    opts.terminate = True
    with pytest.raises(Fail) as theirs:
        ort.InferenceSession(str(path)).run(None, {"x": _x()}, opts)
    sess = _session(path, tmp_path / "cache")
    with pytest.raises(Fail) as ours:
        sess.run(None, {"x": _x()}, opts)
    assert str(ours.value) == str(theirs.value)
    assert rkort.session_stats(sess)["npu_calls"] == 0
    opts.terminate = False
    assert sess.run(None, {"x": _x()}, opts)[0].shape == (1, 16)


def test_run_options_tag_and_severity_apply_to_rkorts_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dim compiled per size logs its compile; the call's logid tags the record, and a
    severity above it silences it."""
    path = _model(
        tmp_path / "exact.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"])],
    )
    sess = _session(path, tmp_path / "cache")
    tagged = ort.RunOptions()
    tagged.logid = "request-7"
    quiet = ort.RunOptions()
    quiet.log_severity_level = 3
    with caplog.at_level(logging.DEBUG, logger="rkort"):
        sess.run(None, {"x": np.ones((1, 5), np.float32)}, tagged)
        first = [r.getMessage() for r in caplog.records if r.name.startswith("rkort")]
        caplog.clear()
        sess.run(None, {"x": np.ones((1, 9), np.float32)}, quiet)
        second = [r for r in caplog.records if r.name == "rkort" and r.levelno < logging.ERROR]
    assert first and all(m.startswith("[request-7] ") for m in first if "request" in m)
    assert any(m.startswith("[request-7] ") for m in first)
    assert second == []


def test_an_app_that_imports_rkort_first_under_rkort_run(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    model = _mlp(tmp_path / "mlp.onnx")
    app.write_text(
        "import rkort\n"
        "import numpy as np\n"
        "import onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(model)!r})\n"
        "s.run(None, {'x': np.ones((1, 16), np.float32)})\n"
        "print(s.get_providers()[0], type(s).__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "rkort", "run", "--", sys.executable, str(app)],
        capture_output=True,
        text=True,
        env={**os.environ, "RKORT_CACHE_DIR": str(tmp_path / "cache")},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "could not install" not in done.stderr
    assert done.stdout.split() == [RKNN, "rkort.session"]
