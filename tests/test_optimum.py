"""optimum's ORTModel classes on the RKNN provider after ``rkort.install()``.

Small BERT models (random weights, a local vocabulary) are exported with optimum itself, then
loaded with ``provider="RKNN"`` / ``provider="RKNNExecutionProvider"`` and compared with the same
model on the CPU provider: cosine >= 0.9999 on every output, labels identical.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession as OrtSession

import rkort
from rkort.integrations.install import uninstall
from tests import hf_models
from tests.conftest import RKNN, needs_rknn

pytestmark = needs_rknn

CPU = "CPUExecutionProvider"
TASKS = list(hf_models.TASKS)
# Each class is opened once by the short name and once by the full one (local / export=True).
LOCAL_NAME = {
    "text-classification": "RKNN",
    "feature-extraction": RKNN,
    "token-classification": "RKNN",
    "question-answering": RKNN,
}
EXPORT_NAME = {task: (RKNN if name == "RKNN" else "RKNN") for task, name in LOCAL_NAME.items()}
STATIC = (2, 24)  # (batch, sequence) of the statically exported classifier


@pytest.fixture(scope="module", autouse=True)
def installed(tmp_path_factory):  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RKORT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("RKORT_AUTO", raising=False)
        rkort.install()
        yield
        uninstall()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict[str, Path]]:  # type: ignore[no-untyped-def]
    """task -> {"hf": transformers model dir, "onnx": optimum export with dynamic axes}."""
    root = tmp_path_factory.mktemp("hf")
    out: dict[str, dict[str, Path]] = {}
    for i, task in enumerate(TASKS):
        hf = hf_models.transformers_model(task, root / task / "hf", seed=i)
        out[task] = {"hf": hf, "onnx": hf_models.export(hf, root / task / "onnx", task)}
    static = root / "text-classification" / "static"
    out["text-classification"]["static"] = hf_models.export(
        out["text-classification"]["hf"], static, "text-classification", static=STATIC
    )
    return out


@pytest.fixture(scope="module")
def tok(built):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built["text-classification"]["hf"])


@pytest.fixture(scope="module")
def cpu_models(built):  # type: ignore[no-untyped-def]
    return {
        t: hf_models.optimum_class(t).from_pretrained(built[t]["onnx"], provider=CPU) for t in TASKS
    }


@pytest.fixture(scope="module")
def npu_models(built):  # type: ignore[no-untyped-def]
    return {
        t: hf_models.optimum_class(t).from_pretrained(built[t]["onnx"], provider=LOCAL_NAME[t])
        for t in TASKS
    }


def assert_close(got: Any, want: Any, task: str) -> None:
    got_arrays, want_arrays = hf_models.outputs(got), hf_models.outputs(want)
    assert got_arrays.keys() == want_arrays.keys()
    for name, w in want_arrays.items():
        g = got_arrays[name]
        assert g.shape == w.shape, name
        assert g.dtype == w.dtype, name
        assert hf_models.cosine(g, w) >= 0.9999, (name, hf_models.cosine(g, w))
        if task != "feature-extraction" and name.endswith("logits"):
            np.testing.assert_array_equal(g.argmax(-1), w.argmax(-1))


@pytest.mark.parametrize("task", TASKS)
def test_model_session_is_an_onnxruntime_session(npu_models, task) -> None:  # type: ignore[no-untyped-def]
    session = npu_models[task].model
    assert isinstance(session, onnxruntime.InferenceSession)
    assert isinstance(session, OrtSession)
    assert isinstance(session, rkort.InferenceSession)
    assert npu_models[task].session is session


@pytest.mark.parametrize("task", TASKS)
def test_model_reports_rknn(npu_models, task) -> None:  # type: ignore[no-untyped-def]
    model = npu_models[task]
    assert model.model.get_providers()[0] == RKNN
    assert model.provider == RKNN
    assert RKNN in model.provider_options


@pytest.mark.parametrize("task", TASKS)
def test_numpy_inputs_match_cpu(npu_models, cpu_models, tok, task) -> None:  # type: ignore[no-untyped-def]
    feed = dict(hf_models.inputs(tok, task, "np"))
    got, want = npu_models[task](**feed), cpu_models[task](**feed)
    assert all(isinstance(v, np.ndarray) for v in got.values() if v is not None)
    assert_close(got, want, task)


@pytest.mark.parametrize("task", TASKS)
def test_torch_inputs_match_cpu(npu_models, cpu_models, tok, task) -> None:  # type: ignore[no-untyped-def]
    import torch

    feed = dict(hf_models.inputs(tok, task, "pt", batch=1))
    got, want = npu_models[task](**feed), cpu_models[task](**feed)
    assert all(isinstance(v, torch.Tensor) for v in got.values() if v is not None)
    assert_close(got, want, task)


@pytest.mark.parametrize("length", [3, 9, 17])
def test_any_length(npu_models, cpu_models, tok, length) -> None:  # type: ignore[no-untyped-def]
    task = "text-classification"
    feed = dict(hf_models.inputs(tok, task, "np", batch=1, length=length))
    assert feed["input_ids"].shape == (1, length)
    assert_close(npu_models[task](**feed), cpu_models[task](**feed), task)


@pytest.mark.parametrize("task", TASKS)
def test_export_true(built, cpu_models, tok, task) -> None:  # type: ignore[no-untyped-def]
    model = hf_models.optimum_class(task).from_pretrained(
        built[task]["hf"], export=True, provider=EXPORT_NAME[task]
    )
    assert isinstance(model.model, onnxruntime.InferenceSession)
    feed = dict(hf_models.inputs(tok, task, "np"))
    assert_close(model(**feed), cpu_models[task](**feed), task)


def test_export_true_reports_rknn(built) -> None:  # type: ignore[no-untyped-def]
    cls = hf_models.optimum_class("text-classification")
    model = cls.from_pretrained(built["text-classification"]["hf"], export=True, provider="RKNN")
    assert model.provider == RKNN


def test_static_export_runs_on_rknn(built, cpu_models, tok, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A model exported at a fixed shape runs on RKNN today; provider options reach the session."""
    task = "text-classification"
    cls = hf_models.optimum_class(task)
    model = cls.from_pretrained(
        built[task]["static"], provider="RKNN", provider_options={"target": "rk3588"}
    )
    assert model.model.get_providers() == [RKNN, CPU]
    assert model.provider == RKNN
    assert model.provider_option == {"target": "rk3588"}
    feed = dict(hf_models.inputs(tok, task, "np", batch=STATIC[0], length=STATIC[1]))
    reference = cls.from_pretrained(built[task]["static"], provider=CPU)
    assert_close(model(**feed), reference(**feed), task)
    # save_pretrained copies the model the session was opened from; it opens again on RKNN.
    model.save_pretrained(tmp_path / "saved")
    again = cls.from_pretrained(tmp_path / "saved", provider=RKNN)
    assert again.provider == RKNN
    np.testing.assert_allclose(again(**feed).logits, model(**feed).logits, rtol=0, atol=0)


def test_save_pretrained_round_trip(npu_models, tok, tmp_path) -> None:  # type: ignore[no-untyped-def]
    task = "token-classification"
    model = npu_models[task]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.onnx").is_file()
    again = hf_models.optimum_class(task).from_pretrained(tmp_path, provider="RKNN")
    assert again.providers == model.providers
    feed = dict(hf_models.inputs(tok, task, "np"))
    assert_close(again(**feed), model(**feed), task)


def test_transformers_pipeline(npu_models, cpu_models, tok) -> None:  # type: ignore[no-untyped-def]
    from transformers import pipeline

    task = "text-classification"
    npu = pipeline(task, model=npu_models[task], tokenizer=tok)
    cpu = pipeline(task, model=cpu_models[task], tokenizer=tok)
    got, want = npu(hf_models.TEXTS), cpu(hf_models.TEXTS)
    assert [r["label"] for r in got] == [r["label"] for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-3)


def test_optimum_pipelines(npu_models, cpu_models, tok) -> None:  # type: ignore[no-untyped-def]
    from optimum.pipelines import pipeline

    task = "question-answering"
    npu = pipeline(task, model=npu_models[task], tokenizer=tok, accelerator="ort")
    cpu = pipeline(task, model=cpu_models[task], tokenizer=tok, accelerator="ort")
    question = {"question": hf_models.QUESTION, "context": hf_models.CONTEXT}
    got, want = npu(**question), cpu(**question)
    assert (got["start"], got["end"], got["answer"]) == (want["start"], want["end"], want["answer"])

    task = "token-classification"
    npu = pipeline(task, model=npu_models[task], tokenizer=tok, accelerator="ort")
    cpu = pipeline(task, model=cpu_models[task], tokenizer=tok, accelerator="ort")
    got_entities, want_entities = npu(hf_models.TEXTS[1]), cpu(hf_models.TEXTS[1])
    assert [e["entity"] for e in got_entities] == [e["entity"] for e in want_entities]


def test_to_cpu_keeps_working(npu_models, tok) -> None:  # type: ignore[no-untyped-def]
    model = npu_models["feature-extraction"]
    assert model.to("cpu") is model
    feed = dict(hf_models.inputs(tok, "feature-extraction", "np", batch=1))
    assert model(**feed).last_hidden_state.shape[:2] == feed["input_ids"].shape


def test_unknown_provider_is_optimums_error(built) -> None:  # type: ignore[no-untyped-def]
    cls = hf_models.optimum_class("text-classification")
    with pytest.raises(ValueError, match=r"Asked to use RKNNX .*'RKNNExecutionProvider'"):
        cls.from_pretrained(built["text-classification"]["onnx"], provider="RKNNX")


def test_auto_moves_default_cpu_sessions(built, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """RKORT_AUTO=1: optimum's default provider (the CPU) becomes RKNN first, while export
    validation, which compares against PyTorch on purpose, keeps the CPU."""
    monkeypatch.setenv("RKORT_AUTO", "1")
    task = "text-classification"
    cls = hf_models.optimum_class(task)
    model = cls.from_pretrained(built[task]["static"])  # provider defaults to the CPU
    assert model.provider == RKNN
    assert model.model.get_providers() == [RKNN, CPU]

    caplog.set_level(logging.DEBUG, logger="rkort")
    out = built[task]["hf"].parent / "validated"
    hf_models.export(built[task]["hf"], out, task, validate=True)  # raises if validation fails
    kept = [r.getMessage() for r in caplog.records if "keeps providers" in r.getMessage()]
    assert kept and all("optimum.exporters" in m for m in kept), kept
