"""Differential conformance on the zoo's real models (compat/zoo/scenarios.py): every call on
onnxruntime and on rkort (CPU and RKNN providers) gives the same outcome, judged as the other
scenarios are (compat/test_conformance.py): the same exception type and message, or outputs of
the same dtype and shape, equal on the CPU provider; on RKNN each output at cosine >= 0.999 (the
zoo's goal) with the same NaNs.

rkort's sessions here are strict (RKORT_STRICT=1, as in tests/): a bug in the NPU path raises
instead of being answered by onnxruntime. A model with a known defect (compat/zoo/apps.py
KNOWN_DEFECTS) is expected to fail with exactly that defect's message until it is fixed."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import rkort

from .conftest import CONFIGS, RKNN, rknn_available
from .scenarios import Call, Scenario
from .test_conformance import _config_params, _cosine, _outcome, assert_same_outcome
from .zoo.apps import KNOWN_DEFECTS
from .zoo.scenarios import DOCUMENTED_CPU, model_file, zoo_scenarios

SCENARIOS = zoo_scenarios()
CALLS = [(s, c) for s in SCENARIOS for c in s.calls]
_sessions: dict[tuple[str, str], Any] = {}
_references: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _strict(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("RKORT_STRICT", "1")
    yield


def _reference(s: Scenario) -> ort.InferenceSession:
    if s.name not in _references:
        _references[s.name] = ort.InferenceSession(s.model(), providers=["CPUExecutionProvider"])
    return _references[s.name]


def _known_defect(s: Scenario, error: BaseException) -> None:
    known = KNOWN_DEFECTS.get(model_file(s))
    if known is not None and known in str(error):
        pytest.xfail(f"known rkort defect in {model_file(s)} ({known}); see KNOWN_DEFECTS")


#: What onnxruntime printed while opening a session (its own "EP Error ... Falling back" when
#: a provider's start raised), by (scenario, config).
_printed: dict[tuple[str, str], str] = {}


def _session(s: Scenario, config: str) -> rkort.InferenceSession:
    key = (s.name, config)
    if key not in _sessions:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                _sessions[key] = rkort.InferenceSession(s.model(), providers=CONFIGS[config])
        except Exception as e:
            _known_defect(s, e)
            raise
        finally:
            _printed[key] = printed.getvalue()
            sys.stdout.write(_printed[key])
    if config == "rknn" and RKNN not in _sessions[key].get_providers():
        _known_defect(s, Exception(_printed[key]))
    return _sessions[key]


@pytest.mark.parametrize("config", _config_params())
@pytest.mark.parametrize("scenario,call", CALLS, ids=[f"{s.name}-{c.label}" for s, c in CALLS])
def test_zoo_run_matches_onnxruntime(scenario: Scenario, call: Call, config: str) -> None:
    sess = _session(scenario, config)
    # One feed each, from the same seed: neither run sees what the other may have done to it.
    expected, actual = (
        _outcome(lambda s=s: s.run(call.output_names, call.feed(np.random.default_rng(0))))
        for s in (_reference(scenario), sess)
    )
    if actual[0] == "error" and expected[0] == "ok":
        _known_defect(scenario, actual[1])
    exact = config == "cpu" or RKNN not in sess.get_providers()
    if exact or "error" in (expected[0], actual[0]):
        assert_same_outcome(expected, actual, exact)
        return
    # Outputs on the NPU: the zoo's goal, cosine >= 0.999 per output. Not the element-wise
    # 2e-2 of the small scenarios: a real network's fp16 error reaches a few 1e-2 on single
    # elements (MiniLM: 0.047 at one padded position of 10,752 values, row cosine 0.99999).
    got, want = actual[1], expected[1]
    assert isinstance(got, list) and len(got) == len(want)
    for g, w in zip(got, want):
        assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        finite = np.isfinite(w)
        assert _cosine(g[finite], w[finite]) >= 0.999


@pytest.mark.skipif(not rknn_available(), reason="no RKNN backend on this machine")
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_zoo_model_runs_on_rknn_or_says_why(scenario: Scenario) -> None:
    """After its calls, the RKNN session answered on the NPU, or keeps the CPU for its
    documented reason only."""
    sess = _session(scenario, "rknn")
    stats = rkort.session_stats(sess)
    documented = DOCUMENTED_CPU.get(scenario.name)
    if RKNN in sess.get_providers() or documented is None:
        assert sess.get_providers() == [RKNN, "CPUExecutionProvider"]
        assert stats["npu_calls"] >= 1, stats
    else:
        assert stats["npu_calls"] == 0, stats
        assert stats["cpu_reasons"] and all(documented in r for r in stats["cpu_reasons"]), stats
