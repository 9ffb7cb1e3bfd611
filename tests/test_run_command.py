"""Unchanged onnxruntime programs on the NPU: ``rkort run``, the RKORT_AUTO policy, opting out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from onnxruntime.capi import onnxruntime_inference_collection as ort_collection

import rkort
from rkort.integrations import defaults
from rkort.integrations.defaults import effective_providers
from rkort.integrations.run import SITE_DIR, run_environment
from tests import models
from tests.conftest import RKNN, needs_rknn

ROOT = Path(__file__).resolve().parents[1]
CPU = "CPUExecutionProvider"

# Written the way onnxruntime's own examples are; nothing in it knows about rkort.
APP = textwrap.dedent(
    """
    import json
    import sys

    import numpy as np
    import onnxruntime as ort

    model_path = sys.argv[1]
    if "--default-providers" in sys.argv:
        sess = ort.InferenceSession(model_path)
    else:
        sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    input_meta = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal(input_meta.shape).astype(np.float32)
    outputs = sess.run(None, {input_meta.name: x})
    print(json.dumps({
        "providers": sess.get_providers(),
        "options": sess.get_provider_options(),
        "available": ort.get_available_providers(),
        "y": outputs[0].tolist(),
    }))
    """
)

# The one change a user makes to keep a session on the CPU under `rkort run`.
OPT_OUT_APP = APP.replace(
    'sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])',
    "so = ort.SessionOptions()\n"
    '    so.add_session_config_entry("rkort.auto", "0")\n'
    '    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])',
)
assert OPT_OUT_APP != APP


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("app")
    mlp = models.mlp(d)
    (d / "app.py").write_text(APP)
    (d / "opt_out_app.py").write_text(OPT_OUT_APP)
    feed = np.random.default_rng(0).standard_normal(mlp.input_shapes[0]).astype(np.float32)
    want = ort_collection.InferenceSession(str(mlp.path), providers=[CPU]).run(None, {"x": feed})
    return {"dir": d, "model": mlp.path, "want": want[0]}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKORT_AUTO")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["RKORT_CACHE_DIR"] = str(tmp_path / "cache")
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _rkort_run(*args: str) -> list[str]:
    return [sys.executable, "-m", "rkort", "run", *args]


def _report(p: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _cos(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_plain_python_stays_on_the_cpu(app, tmp_path) -> None:  # type: ignore[no-untyped-def]
    report = _report(
        _run([sys.executable, "app.py", str(app["model"])], _env(tmp_path), app["dir"])
    )
    assert report["providers"] == [CPU]
    assert RKNN not in report["available"]


@needs_rknn
@pytest.mark.parametrize("how", ["cpu-list", "default-providers"])
def test_rkort_run_puts_an_unchanged_app_on_rknn(app, tmp_path, how) -> None:  # type: ignore[no-untyped-def]
    args = [str(app["model"])] + (["--default-providers"] if how == "default-providers" else [])
    p = _run(_rkort_run("--", sys.executable, "app.py", *args), _env(tmp_path), app["dir"])
    report = _report(p)
    assert report["providers"] == [RKNN, CPU]
    assert report["available"][0] == RKNN
    assert _cos(report["y"], app["want"]) >= 0.9999


@needs_rknn
def test_environment_route_for_services(app, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`rkort run --env` prints what a service's environment needs; the command line is unchanged."""
    env = _env(tmp_path)
    printed = _run(_rkort_run("-o", "progress=0", "--env"), env, app["dir"])
    assert printed.returncode == 0, printed.stderr
    lines = dict(line.split("=", 1) for line in printed.stdout.strip().splitlines())
    assert lines["RKORT_AUTO"] == "1"
    assert lines["PYTHONPATH"].split(os.pathsep)[0] == str(SITE_DIR)
    env.update(lines)
    report = _report(_run([sys.executable, "app.py", str(app["model"])], env, app["dir"]))
    assert report["providers"] == [RKNN, CPU]
    assert report["options"][RKNN] == {"progress": "0"}


@needs_rknn
def test_opt_out_by_model_pattern(app, tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = _run(
        _rkort_run("--exclude", "mlp.onnx", "--", sys.executable, "app.py", str(app["model"])),
        _env(tmp_path),
        app["dir"],
    )
    assert _report(p)["providers"] == [CPU]
    env = _env(tmp_path, RKORT_AUTO="1", RKORT_AUTO_EXCLUDE=f"/nowhere/*{os.pathsep}{app['dir']}/*")
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), env["PYTHONPATH"]])
    report = _report(_run([sys.executable, "app.py", str(app["model"])], env, app["dir"]))
    assert report["providers"] == [CPU]
    assert report["available"][0] == RKNN  # installed all the same


@needs_rknn
def test_opt_out_by_session_config(app, tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = _run(
        _rkort_run("--", sys.executable, "opt_out_app.py", str(app["model"])),
        _env(tmp_path),
        app["dir"],
    )
    assert _report(p)["providers"] == [CPU]


@needs_rknn
def test_no_auto_installs_only(app, tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = _run(
        _rkort_run("--no-auto", "--", sys.executable, "app.py", str(app["model"])),
        _env(tmp_path),
        app["dir"],
    )
    report = _report(p)
    assert report["providers"] == [CPU]
    assert report["available"][0] == RKNN


def test_python_without_onnxruntime_never_imports_rkort(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = "import sys; print(sorted(m for m in ('rkort', 'onnxruntime') if m in sys.modules))"
    p = _run(_rkort_run("--", sys.executable, "-c", code), _env(tmp_path), tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_existing_sitecustomize_still_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIR_SITE'] = 'ran'\n")
    env = _env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(theirs)])
    code = (
        "import os, onnxruntime; "
        "print(os.environ.get('THEIR_SITE'), onnxruntime.InferenceSession.__module__)"
    )
    p = _run(_rkort_run("--", sys.executable, "-c", code), env, tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["ran", "rkort.session"]


def test_exit_status_and_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = _env(tmp_path)
    p = _run(_rkort_run("--", sys.executable, "-c", "raise SystemExit(3)"), env, tmp_path)
    assert p.returncode == 3
    p = _run(_rkort_run("--", "no-such-command-here"), env, tmp_path)
    assert p.returncode == 127
    assert "command not found: no-such-command-here" in p.stderr
    p = _run(_rkort_run("-o", "bogus=1", "--", "true"), env, tmp_path)
    assert p.returncode == 2
    assert "bogus" in p.stderr and "Traceback" not in p.stderr
    p = _run(_rkort_run(), env, tmp_path)
    assert p.returncode == 2


def test_run_environment_keeps_pythonpath() -> None:
    env = run_environment({"PYTHONPATH": f"/a{os.pathsep}{SITE_DIR}{os.pathsep}/b", "X": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(SITE_DIR), "/a", "/b"]
    assert env["X"] == "1" and env["RKORT_AUTO"] == "1"
    env = run_environment({}, auto=False, options={"target": "rk3576"}, exclude=["a", "b/c"])
    assert env["RKORT_AUTO"] == "0"
    assert env["RKORT_AUTO_OPTIONS"] == "target=rk3576"
    assert env["RKORT_AUTO_EXCLUDE"] == f"a{os.pathsep}b/c"


# --- the policy itself, in this process -------------------------------------------------------


@pytest.fixture
def auto(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RKORT_AUTO", "1")
    monkeypatch.delenv("RKORT_AUTO_OPTIONS", raising=False)
    monkeypatch.delenv("RKORT_AUTO_EXCLUDE", raising=False)
    monkeypatch.setattr(defaults, "_rknn_available", lambda: True)


def test_policy_off_changes_nothing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("RKORT_AUTO", raising=False)
    assert effective_providers(None, None) == (None, None)
    assert effective_providers([CPU], None) == ([CPU], None)
    monkeypatch.setenv("RKORT_AUTO", "0")
    assert effective_providers([CPU], [{}]) == ([CPU], [{}])


def test_policy_moves_default_and_cpu_only_sessions(auto, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert effective_providers(None, None) == ([RKNN, CPU], None)
    assert effective_providers([], None) == ([RKNN, CPU], None)
    assert effective_providers([CPU], None) == ([RKNN, CPU], None)
    assert effective_providers([CPU], [{"a": "1"}]) == ([RKNN, CPU], [{}, {"a": "1"}])
    assert effective_providers([(CPU, {"a": "1"})], None) == ([RKNN, (CPU, {"a": "1"})], None)
    monkeypatch.setenv("RKORT_AUTO_OPTIONS", "target=rk3576; buckets=16,32")
    want = {"target": "rk3576", "buckets": "16,32"}
    assert effective_providers(None, None) == ([(RKNN, want), CPU], None)
    assert effective_providers([CPU], [{}]) == ([RKNN, CPU], [want, {}])


def test_policy_keeps_explicit_choices(auto) -> None:  # type: ignore[no-untyped-def]
    for providers in (
        ["CUDAExecutionProvider", CPU],
        ["RKNN"],
        [(RKNN, {"target": "rk3562"}), CPU],
        ["AzureExecutionProvider"],
    ):
        assert effective_providers(providers, None) == (providers, None)
    # Malformed arguments go through untouched, for onnxruntime to reject.
    assert effective_providers("CPUExecutionProvider", None) == ("CPUExecutionProvider", None)
    assert effective_providers(None, [{}]) == (None, [{}])


def test_policy_opt_outs(auto, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    so = onnxruntime.SessionOptions()
    so.add_session_config_entry("rkort.auto", "0")
    assert effective_providers([CPU], None, sess_options=so) == ([CPU], None)
    so = onnxruntime.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    assert effective_providers([CPU], None, sess_options=so) == ([CPU], None)
    assert effective_providers([CPU], None, sess_options=onnxruntime.SessionOptions())[0] == [
        RKNN,
        CPU,
    ]
    model = tmp_path / "models" / "vad.onnx"
    monkeypatch.setenv("RKORT_AUTO_EXCLUDE", "*.int8.onnx" + os.pathsep + "vad.onnx")
    assert effective_providers([CPU], None, model_path=model) == ([CPU], None)
    assert effective_providers([CPU], None, model_path=tmp_path / "bert.onnx")[0] == [RKNN, CPU]
    monkeypatch.setenv("RKORT_AUTO_EXCLUDE", f"{tmp_path}/models/*")
    assert effective_providers([CPU], None, model_path=model) == ([CPU], None)
    assert effective_providers([CPU], None, model_path=None)[0] == [RKNN, CPU]


@pytest.mark.parametrize(
    "module",
    [
        "optimum.exporters.onnx.utils",
        "onnxruntime.quantization.calibrate",
        "onnxruntime.transformers.optimizer",
        "rknn.api.rknn",
        "rkort.cli",
    ],
)
def test_policy_keeps_sessions_tools_create(auto, module) -> None:  # type: ignore[no-untyped-def]
    namespace: dict[str, Any] = {"__name__": module, "effective_providers": effective_providers}
    exec("def create():\n    return effective_providers(['CPUExecutionProvider'], None)", namespace)
    assert namespace["create"]() == ([CPU], None)
    namespace["__name__"] = "myapp.inference"
    assert namespace["create"]()[0] == [RKNN, CPU]


def test_policy_without_rknn_keeps_the_cpu(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RKORT_AUTO", "1")
    monkeypatch.setattr(defaults, "_rknn_available", lambda: False)
    monkeypatch.setattr(defaults, "_warned_unavailable", False)
    assert effective_providers(None, None) == (None, None)
    assert effective_providers([CPU], None) == ([CPU], None)
    assert sum("not available" in r.getMessage() for r in caplog.records) == 1


def test_bad_options_text_is_an_error(auto, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RKORT_AUTO_OPTIONS", "target")
    with pytest.raises(ValueError, match="key=value"):
        effective_providers(None, None)


@needs_rknn
def test_session_follows_the_policy(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The policy is the integration's: once rkort.install() has run (as `rkort run` does),
    session creation and set_providers() both apply it; before, a session is what it asks."""
    from rkort.integrations.install import is_installed, uninstall

    monkeypatch.setenv("RKORT_AUTO", "1")
    monkeypatch.setenv("RKORT_CACHE_DIR", str(tmp_path / "cache"))
    mlp = models.mlp(tmp_path)
    was_installed = is_installed()
    uninstall()
    try:
        assert rkort.InferenceSession(str(mlp.path), providers=[CPU]).get_providers() == [CPU]
        rkort.install()
        sess = rkort.InferenceSession(str(mlp.path), providers=[CPU])
        assert sess.get_providers() == [RKNN, CPU]
        sess.set_providers([CPU])
        assert sess.get_providers() == [RKNN, CPU]
        so = onnxruntime.SessionOptions()
        so.add_session_config_entry("rkort.auto", "0")
        opted_out = rkort.InferenceSession(str(mlp.path), so, providers=[CPU])
        assert opted_out.get_providers() == [CPU]
        monkeypatch.setenv("RKORT_AUTO", "0")
        assert rkort.InferenceSession(str(mlp.path), providers=[CPU]).get_providers() == [CPU]
    finally:
        if not was_installed:
            uninstall()


@needs_rknn
def test_readme_example(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """README's commands: build the example here, run its unchanged app through `rkort run`."""
    from rkort.integrations.example import build

    directory = build(tmp_path / "example")
    model = directory / "onnx" / "model.onnx"
    app = directory / "app.py"
    env = _env(tmp_path)
    plain = _run([sys.executable, str(app), str(model)], env, tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "providers: ['CPUExecutionProvider']" in plain.stdout
    moved = _run(_rkort_run("--", sys.executable, str(app), str(model)), env, tmp_path)
    assert moved.returncode == 0, moved.stderr
    assert f"providers: ['{RKNN}', '{CPU}']" in moved.stdout
    cpu, npu = (
        np.array([float(v) for v in re.findall(r"-?\d+\.\d*(?:e-?\d+)?", out.split("logits:")[1])])
        for out in (plain.stdout, moved.stdout)
    )
    assert cpu.shape == npu.shape == (2,)
    np.testing.assert_allclose(npu, cpu, atol=2e-3)
