"""The session with the RKNN provider: provider handling, fallback, noise, threads, processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import rkort
from rkort.capi.onnxruntime_pybind11_state import EPFail, InvalidArgument
from tests import models
from tests.conftest import RKNN, needs_rknn

pytestmark = needs_rknn


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):  # type: ignore[no-untyped-def]
    return models.mlp(tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def mlp_session(mlp, tmp_path_factory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("cache")
    return rkort.InferenceSession(
        mlp.path, providers=[(RKNN, {"cache_dir": str(cache)}), "CPUExecutionProvider"]
    )


def _feed(m) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return dict(zip(m.input_names, m.make_feed(0)))


def test_rknn_session_reports_itself_and_matches_onnxruntime(mlp, mlp_session) -> None:  # type: ignore[no-untyped-def]
    assert mlp_session.get_providers() == [RKNN, "CPUExecutionProvider"]
    assert RKNN in mlp_session.get_provider_options()
    ref = ort.InferenceSession(str(mlp.path)).run(None, _feed(mlp))
    got = mlp_session.run(None, _feed(mlp))
    assert _cos(got[0], ref[0]) >= 0.9999
    assert mlp_session._rknn is not None and mlp_session._rknn.backend.name in (
        "simulator",
        "board",
        "adb",
    )


def test_alias_and_options_forms(mlp, cache_dir) -> None:  # type: ignore[no-untyped-def]
    for providers, provider_options in [
        (["RKNN"], None),
        ([("RKNN", {"target": "rk3588"})], None),
        (["RKNN", "CPUExecutionProvider"], [{"dtype": "fp16"}, {}]),
    ]:
        s = rkort.InferenceSession(mlp.path, providers=providers, provider_options=provider_options)
        assert s.get_providers() == [RKNN, "CPUExecutionProvider"]
        assert list(s.get_provider_options()) == [RKNN, "CPUExecutionProvider"]


def test_unknown_option_and_bad_values_raise_invalid_argument(mlp, cache_dir) -> None:  # type: ignore[no-untyped-def]
    for opts, needle in [
        ({"targt": "rk3588"}, "Unknown RKNNExecutionProvider option"),
        ({"target": "rk9999"}, "supported targets"),
        ({"dtype": "w8a8"}, "needs calibration data"),
        ({"core_mask": "seven"}, "core_mask"),
        ({"fallback": "maybe"}, "expected 1 or 0"),
    ]:
        with pytest.raises(InvalidArgument, match=needle):
            rkort.InferenceSession(mlp.path, providers=[(RKNN, opts)])


def test_unbuildable_model_falls_back_to_cpu_with_a_warning(tmp_path, cache_dir, caplog) -> None:  # type: ignore[no-untyped-def]
    path = models.nonzero(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rkort"):
        s = rkort.InferenceSession(path, providers=[RKNN, "CPUExecutionProvider"])
    assert s.get_providers() == ["CPUExecutionProvider"]
    assert any("falling back" in r.getMessage() for r in caplog.records)
    feed = {
        i.name: np.ones([d if isinstance(d, int) else 3 for d in i.shape], np.float32)
        for i in s.get_inputs()
    }
    ref = ort.InferenceSession(str(path)).run(None, feed)
    np.testing.assert_array_equal(s.run(None, feed)[0], ref[0])
    assert not list(cache_dir.rglob("*.rknn")), "a failed build must leave no blob in the cache"


def test_fallback_off_raises_ep_fail(tmp_path, cache_dir) -> None:  # type: ignore[no-untyped-def]
    path = models.nonzero(tmp_path)
    with pytest.raises(EPFail, match="RKNNExecutionProvider cannot run this model"):
        rkort.InferenceSession(path, providers=[(RKNN, {"fallback": "0"})])


def test_opset_20_model_is_lowered_and_runs_on_rknn(tmp_path, cache_dir) -> None:  # type: ignore[no-untyped-def]
    path = models.relu_opset20(tmp_path)
    s = rkort.InferenceSession(path, providers=[(RKNN, {"fallback": "0"})])
    assert s.get_providers()[0] == RKNN
    feed = {
        i.name: np.linspace(-1, 1, int(np.prod(i.shape)), dtype=np.float32).reshape(i.shape)
        for i in s.get_inputs()
    }
    ref = ort.InferenceSession(str(path)).run(None, feed)
    assert _cos(s.run(None, feed)[0], ref[0]) >= 0.9999


def test_set_providers_switches_between_rknn_and_cpu(mlp, cache_dir) -> None:  # type: ignore[no-untyped-def]
    s = rkort.InferenceSession(mlp.path, providers=["CPUExecutionProvider"])
    assert s.get_providers() == ["CPUExecutionProvider"]
    cpu = s.run(None, _feed(mlp))[0]
    s.set_providers([RKNN, "CPUExecutionProvider"])
    assert s.get_providers() == [RKNN, "CPUExecutionProvider"]
    assert _cos(s.run(None, _feed(mlp))[0], cpu) >= 0.9999
    s.set_providers(["CPUExecutionProvider"])
    assert s.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_array_equal(s.run(None, _feed(mlp))[0], cpu)


def test_bytes_model_runs_on_rknn(mlp, cache_dir) -> None:  # type: ignore[no-untyped-def]
    s = rkort.InferenceSession(Path(mlp.path).read_bytes(), providers=[RKNN])
    assert s._model_path is None
    assert s.get_providers()[0] == RKNN
    ref = ort.InferenceSession(str(mlp.path)).run(None, _feed(mlp))[0]
    assert _cos(s.run(None, _feed(mlp))[0], ref) >= 0.9999


def test_ort_values_and_io_binding_run_on_rknn(mlp, mlp_session) -> None:  # type: ignore[no-untyped-def]
    feed = _feed(mlp)
    expected = mlp_session.run(None, feed)[0]
    outs = mlp_session.run_with_ort_values(
        None, {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
    )
    np.testing.assert_array_equal(outs[0].numpy(), expected)
    binding = mlp_session.io_binding()
    for k, v in feed.items():
        binding.bind_cpu_input(k, v)
    binding.bind_output(mlp.output_names[0])
    mlp_session.run_with_iobinding(binding)
    np.testing.assert_array_equal(binding.copy_outputs_to_cpu()[0], expected)


def test_threads_share_one_session(mlp, mlp_session) -> None:  # type: ignore[no-untyped-def]
    feeds = [dict(zip(mlp.input_names, mlp.make_feed(seed))) for seed in range(8)]
    serial = [mlp_session.run(None, f)[0] for f in feeds]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                out = mlp_session.run(None, feeds[i])[0]
                assert np.array_equal(out, serial[i])
            results[i] = out
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(8):
        np.testing.assert_array_equal(results[i], serial[i])


def test_toolkit_noise_never_reaches_stdout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = models.conv_relu(tmp_path)
    script = textwrap.dedent(
        f"""
        import numpy as np, rkort
        s = rkort.InferenceSession({str(m.path)!r}, providers=["RKNNExecutionProvider"])
        out = s.run(None, {{{m.input_names[0]!r}: np.ones({list(m.input_shapes[0])}, np.float32)}})
        print("RESULT", s.get_providers()[0], out[0].shape)
        """
    )
    env = {**os.environ, "RKORT_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines() == [f"RESULT {RKNN} {tuple(m.output_shapes[0])}"]
    assert "RKNN" not in p.stderr and "GraphPreparing" not in p.stderr, p.stderr


def test_processes_opening_one_new_model_compile_it_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = models.mlp(tmp_path)
    script = textwrap.dedent(
        f"""
        import json, logging, sys, numpy as np, rkort
        built = []
        class H(logging.Handler):
            def emit(self, r):
                if r.getMessage().startswith("compiled "):
                    built.append(1)
        logging.getLogger("rkort").addHandler(H()); logging.getLogger("rkort").setLevel(logging.INFO)
        s = rkort.InferenceSession({str(m.path)!r}, providers=["RKNNExecutionProvider"])
        feed = dict(zip({list(m.input_names)!r}, [np.full({list(m.input_shapes[0])}, 0.5, np.float32)]))
        print(json.dumps({{"built": len(built), "out": s.run(None, feed)[0].tolist(), "p": s.get_providers()}}))
        """
    )
    env = {**os.environ, "RKORT_CACHE_DIR": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["built"] for r in reports) == 1
    assert all(r["p"][0] == RKNN for r in reports)
    assert all(r["out"] == reports[0]["out"] for r in reports)
    assert len(rkort.cache.Cache(tmp_path / "cache").entries()) == 1


def test_profiling_writes_onnxruntime_trace(mlp, cache_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    so = rkort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "trace")
    s = rkort.InferenceSession(mlp.path, so, providers=[RKNN])
    s.run(None, _feed(mlp))
    assert s.get_profiling_start_time_ns() > 0
    s.run(None, _feed(mlp))
    path = s.end_profiling()
    events = json.loads(Path(path).read_text())
    ours = [e for e in events if e["name"] == f"{RKNN}_run"]
    assert len(ours) == 2 and all(e["ph"] == "X" and e["dur"] >= 0 and e["ts"] >= 0 for e in ours)
    assert ours[0]["args"]["backend"] in ("simulator", "board", "adb")
    assert any(e["name"] == "session_initialization" for e in events)  # onnxruntime's own


@pytest.mark.parametrize("builder", ["islands", "bert"])
def test_models_with_cpu_only_ops_run_in_segments_through_the_session(
    builder, tmp_path, cache_dir
) -> None:  # type: ignore[no-untyped-def]
    m = models.cpu_islands(tmp_path) if builder == "islands" else models.bert_with_cpu_op(tmp_path)
    so = rkort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "trace")
    s = rkort.InferenceSession(m.path, so, providers=[RKNN, "CPUExecutionProvider"])
    assert s.get_providers()[0] == RKNN
    program = next(iter(s._rknn._programs.values()))
    devices = [seg.device for seg in program.segments]
    assert "cpu" in devices and "npu" in devices
    feed = dict(zip(m.input_names, m.make_feed(0)))
    got = s.run(None, feed)
    want = ort.InferenceSession(str(m.path)).run(None, feed)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if w.dtype.kind == "f":
            assert _cos(g, w) >= 0.9999
        else:
            np.testing.assert_array_equal(g, w)
    events = json.loads(Path(s.end_profiling()).read_text())
    seg_events = [e for e in events if e["name"].startswith("segment_")]
    assert len(seg_events) == len(program.segments)
    assert {e["args"]["device"] for e in seg_events} == set(devices)


# -- no silent CPU ---------------------------------------------------------------------------------


def test_every_call_is_counted_with_its_reason(mlp, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="rkort")
    sess = rkort.InferenceSession(
        mlp.path, providers=[(RKNN, {"cache_dir": str(tmp_path / "c")}), "CPUExecutionProvider"]
    )
    feed = _feed(mlp)
    sess.run(None, feed)
    sess.run_with_ort_values(
        None, {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
    )
    huge = {k: np.full_like(v, 1e6) for k, v in feed.items()}
    for _ in range(2):
        np.testing.assert_array_equal(
            sess.run(None, huge)[0], ort.InferenceSession(str(mlp.path)).run(None, huge)[0]
        )
    stats = rkort.session_stats(sess)
    assert stats["npu_calls"] == 2 and stats["cpu_calls"] == 2
    assert stats["cpu_reasons"] == {"an input holds values beyond float16's range": 2}
    assert stats["compiles"] == 1 and stats["providers"] == [RKNN, "CPUExecutionProvider"]
    logged = [r for r in caplog.records if "runs on the CPU" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO  # once per reason
    cpu = rkort.InferenceSession(mlp.path, providers=["CPUExecutionProvider"])
    cpu.run(None, feed)
    assert rkort.session_stats(cpu)["cpu_reasons"] == {f"{RKNN} was not asked for": 1}
    with pytest.raises(TypeError, match="rkort InferenceSession"):
        rkort.session_stats(ort.InferenceSession(str(mlp.path)))


def test_rknn_is_listed_only_when_some_part_runs_on_the_npu(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A model whose dims are all compiled per size, and whose every node needs the CPU, says
    so when it opens (and runs on the CPU, counted), instead of listing RKNN."""
    from onnx import TensorProto, helper

    from tests.models import _graph_model, _save

    model = _graph_model(
        [helper.make_node("NonZero", ["x"], ["y"])],
        "dynamic_nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, None])],
        [],
    )
    path = _save(model, tmp_path / "dynamic_nonzero.onnx")
    caplog.set_level(logging.WARNING, logger="rkort")
    sess = rkort.InferenceSession(path, providers=[(RKNN, {"cache_dir": str(tmp_path / "c")})])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert any("no part of this model can run on the NPU" in r.getMessage() for r in caplog.records)
    sess.run(None, {"x": np.array([0.0, 1.0, 2.0], np.float32)})
    (reason,) = rkort.session_stats(sess)["cpu_reasons"]
    assert "NonZero" in reason
