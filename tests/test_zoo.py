"""The zoo: unchanged onnxruntime apps of packages that ship real models (compat/zoo/), run with
plain python and under `rkort run`, must print the same answer; the NPU must really answer, or
the session must say the documented reason it does not. One app also runs on a rehearsed board
from a cache `rkort warmup` filled.

An app whose package is not installed is skipped (they come with the dev extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compat.zoo.apps import APPS, KNOWN_DEFECTS, App, model_paths
from rkort.rehearsal.report import gather
from rkort.stats import REPORT_ENV
from tests.conftest import RKNN, needs_rknn

ROOT = Path(__file__).resolve().parents[1]


def _env(cache: Path, report: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKORT_AUTO")}
    env.pop("RKORT_BOARD", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["RKORT_CACHE_DIR"] = str(cache)
    env["HF_HUB_OFFLINE"] = "1"
    if report is not None:
        # Each process started by `rkort run` writes its sessions' figures there at exit (what
        # the board rehearsal's report reads).
        report.mkdir(parents=True, exist_ok=True)
        env[REPORT_ENV] = str(report)
    return env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )


def _output(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _app(name: str) -> App:
    app = APPS[name]
    if not app.installed():
        pytest.skip(f"{name}: {', '.join(app.missing())} not installed")
    return app


_references: dict[str, Any] = {}


def _reference(app: App, tmp: Path) -> Any:
    """What the app prints on plain onnxruntime (once per test run)."""
    if app.name not in _references:
        _references[app.name] = _output(_run([sys.executable, str(app.path)], _env(tmp / "cache")))
    return _references[app.name]


def _under_rkort(app: App, tmp: Path, *run_flags: str) -> tuple[Any, list[dict[str, Any]], str]:
    report = tmp / "report"
    done = _run(
        [sys.executable, "-m", "rkort", "run", *run_flags, "--", sys.executable, str(app.path)],
        _env(tmp / "cache", report),
    )
    if done.returncode != 0:
        for model in app.models:
            known = KNOWN_DEFECTS.get(model)
            if known is not None and known in done.stderr:
                pytest.xfail(f"known rkort defect in {model} ({known}); see KNOWN_DEFECTS")
    return _output(done), gather(report), done.stderr


def _assert_npu_answered(app: App, sessions: list[dict[str, Any]]) -> None:
    """Every session of the app's models ran its calls on the NPU, or keeps the CPU for the
    documented reason only."""
    by_model = {s["model"]: s for s in sessions}
    assert set(app.models) <= set(by_model), (app.models, sorted(by_model))
    for model in app.models:
        s = by_model[model]
        calls = s["npu_calls"] + s["cpu_calls"]
        assert calls > 0, s
        documented = app.cpu_reasons.get(model)
        if RKNN in s["providers"] or documented is None:
            assert RKNN in s["providers"], s
            assert s["npu_calls"] == calls and s["cpu_calls"] == 0, s
            assert s["compiles"] + s["blobs_loaded"] >= 1, s
        else:
            assert s["npu_calls"] == 0 and s["cpu_reasons"], s
            for reason in s["cpu_reasons"]:
                assert documented in reason, (model, reason)


@needs_rknn
@pytest.mark.parametrize("name", list(APPS))
def test_an_unchanged_app_gives_the_same_answer_under_rkort_run(name: str, tmp_path: Path) -> None:
    app = _app(name)
    want = _reference(app, tmp_path)
    got, sessions, _ = _under_rkort(app, tmp_path)
    assert app.compare(want, got) == []
    _assert_npu_answered(app, sessions)


#: Apps rehearsed on a board: the model and the one shape the app feeds it (what a build host
#: warms for it).
BOARD_APPS = {
    "magika": ("model.onnx", "bytes=1x2048"),
    "nudenet": ("320n.onnx", "images=1x3x320x320"),
}


@needs_rknn
@pytest.mark.parametrize("name", list(BOARD_APPS))
def test_an_unchanged_app_on_a_rehearsed_board_from_a_warmed_cache(
    name: str, tmp_path: Path
) -> None:
    """The board path: `rkort warmup` on this host fills the cache with the shape the app feeds,
    then the unchanged app runs on a rehearsed rk3588 with no converter: every call from the
    warmed blob, nothing compiled, the same answer."""
    app = _app(name)
    model_name, shape = BOARD_APPS[name]
    want = _reference(app, tmp_path)
    model = model_paths(app)[model_name]
    warm = _run(
        [sys.executable, "-m", "rkort", "warmup", str(model), "-q", "--target", "rk3588"]
        + ["--shape", shape],
        _env(tmp_path / "cache"),
    )
    assert warm.returncode == 0, warm.stderr
    # The rehearsal gathers its own report (it prints it on stderr at exit).
    got, _, stderr = _under_rkort(app, tmp_path, "--board", "rk3588")
    assert app.compare(want, got) == []
    summary = next(line for line in stderr.splitlines() if line.startswith("rkort board rehearsal"))
    assert (
        "1 session(s) in 1 process(es)" in summary
        and " 0 on the CPU; 0 compile(s), 1 blob(s) loaded" in summary
    )
    npu = next(line for line in stderr.splitlines() if line.strip().startswith(f"{model_name} ["))
    assert npu.strip().startswith(f"{model_name} [{RKNN}, CPUExecutionProvider]:")
    assert npu.strip().endswith(" NPU, 0 CPU") and not npu.strip().endswith(": 0 NPU, 0 CPU")
