"""Differential conformance: every scenario runs on onnxruntime and on rkort (CPU and RKNN
providers); outputs, or the exceptions' types and messages, must agree."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import rkort

from .conftest import CONFIGS, RKNN, rknn_available
from .scenarios import Call, Scenario, scenarios, unknown_op

SCENARIOS = scenarios()
_sessions: dict[tuple[str, str], Any] = {}
_references: dict[str, Any] = {}


def _config_params() -> list[Any]:
    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                name == "rknn" and not rknn_available(), reason="no RKNN backend on this machine"
            ),
        )
        for name in CONFIGS
    ]


def _reference(s: Scenario) -> ort.InferenceSession:
    if s.name not in _references:
        _references[s.name] = ort.InferenceSession(s.model(), providers=["CPUExecutionProvider"])
    return _references[s.name]


def _session(s: Scenario, config: str) -> rkort.InferenceSession:
    if (s.name, config) not in _sessions:
        _sessions[(s.name, config)] = rkort.InferenceSession(s.model(), providers=CONFIGS[config])
    return _sessions[(s.name, config)]


def _outcome(fn) -> tuple[str, Any]:  # type: ignore[no-untyped-def]
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - the exception is the outcome being compared
        return "error", e


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return 1.0 if denom == 0 else float(a @ b / denom)


def assert_same_outcome(expected: tuple[str, Any], actual: tuple[str, Any], exact: bool) -> None:
    kind, value = actual
    if expected[0] == "error":
        assert kind == "error", f"onnxruntime raised {expected[1]!r}, rkort returned {value!r}"
        assert type(value) is type(expected[1]), (type(value), type(expected[1]))
        assert str(value) == str(expected[1])
        return
    if kind == "error":
        raise AssertionError(f"onnxruntime returned outputs, rkort raised {value!r}") from value
    ref = expected[1]
    assert isinstance(value, list) and len(value) == len(ref)
    for got, want in zip(value, ref):
        if not isinstance(want, np.ndarray):  # sequences and maps (e.g. ZipMap output)
            assert got == want
            continue
        assert isinstance(got, np.ndarray)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.flags.writeable
        if exact or want.dtype.kind not in "fc":
            np.testing.assert_array_equal(got, want)
            continue
        finite = np.isfinite(want)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        if finite.any():
            assert _cosine(got[finite], want[finite]) >= 0.9999
            np.testing.assert_allclose(got[finite], want[finite], rtol=2e-2, atol=2e-2)


CALLS = [(s, c) for s in SCENARIOS for c in s.calls]


@pytest.mark.parametrize("config", _config_params())
@pytest.mark.parametrize("scenario,call", CALLS, ids=[f"{s.name}-{c.label}" for s, c in CALLS])
def test_run_matches_onnxruntime(scenario: Scenario, call: Call, config: str) -> None:
    ref = _reference(scenario)
    sess = _session(scenario, config)
    expected = _outcome(lambda: ref.run(call.output_names, call.feed(np.random.default_rng(0))))
    actual = _outcome(lambda: sess.run(call.output_names, call.feed(np.random.default_rng(0))))
    assert_same_outcome(expected, actual, exact=config == "cpu" or RKNN not in sess.get_providers())


@pytest.mark.parametrize("config", _config_params())
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_session_api_matches_onnxruntime(scenario: Scenario, config: str) -> None:
    ref = _reference(scenario)
    sess = _session(scenario, config)
    for mine, theirs in [
        (sess.get_inputs(), ref.get_inputs()),
        (sess.get_outputs(), ref.get_outputs()),
        (sess.get_overridable_initializers(), ref.get_overridable_initializers()),
    ]:
        assert [(a.name, a.shape, a.type) for a in mine] == [
            (a.name, a.shape, a.type) for a in theirs
        ]
    m, r = sess.get_modelmeta(), ref.get_modelmeta()
    for field in (
        "custom_metadata_map",
        "description",
        "domain",
        "graph_description",
        "graph_name",
        "producer_name",
        "version",
    ):
        assert getattr(m, field) == getattr(r, field), field
    expected_providers = ["CPUExecutionProvider"]
    if config == "rknn" and scenario.runs_on_rknn:
        expected_providers = [RKNN, "CPUExecutionProvider"]
    assert sess.get_providers() == expected_providers
    assert set(sess.get_provider_options()) == set(expected_providers)
    model = scenario.model()
    assert sess._model_path == (None if isinstance(model, bytes) else os.fspath(model))
    assert isinstance(sess, ort.InferenceSession)


def _construct(lib: Any, source: Any, providers: Any) -> Any:
    return lib.InferenceSession(source, providers=providers)


BAD_SOURCES = {
    "missing file": lambda tmp: "nofile.onnx",
    "missing file (PathLike)": lambda tmp: tmp / "nofile.onnx",
    "invalid bytes": lambda tmp: b"not a model",
    "truncated model": lambda tmp: scenarios()[0].model()[:40],
    "unknown op": lambda tmp: unknown_op(),
    "int": lambda tmp: 3,
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_construction_errors_match_onnxruntime(case: str, config: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = BAD_SOURCES[case](tmp_path)
    expected = _outcome(lambda: _construct(ort, source, None))
    actual = _outcome(lambda: _construct(rkort, source, CONFIGS[config]))
    assert expected[0] == actual[0] == "error", (expected, actual)
    assert type(actual[1]) is type(expected[1])
    assert str(actual[1]) == str(expected[1])
