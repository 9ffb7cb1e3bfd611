"""``rkort.install()``: onnxruntime's names, optimum's copies of them, both import orders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from onnxruntime.capi import onnxruntime_inference_collection as ort_collection

import rkort
import rkort.integrations.install as install_module
from rkort.integrations.install import is_installed, uninstall
from tests import hf_models, models
from tests.conftest import RKNN, needs_rknn

ROOT = Path(__file__).resolve().parents[1]
CPU = "CPUExecutionProvider"
STATIC = (2, 24)


@pytest.fixture
def installed():  # type: ignore[no-untyped-def]
    rkort.install()
    yield
    uninstall()


def test_install_patches_onnxruntime_and_is_idempotent(installed) -> None:  # type: ignore[no-untyped-def]
    rkort.install()
    rkort.install()
    assert is_installed()
    assert onnxruntime.InferenceSession is rkort.InferenceSession
    assert onnxruntime.IOBinding is rkort.IOBinding
    hooks = [f for f in sys.meta_path if isinstance(f, install_module._OptimumImportHook)]
    assert len(hooks) == 1
    for listing in (
        onnxruntime.get_available_providers,
        rkort.get_available_providers,
        onnxruntime.get_all_providers,
        rkort.get_all_providers,
    ):
        names = listing()
        assert len(names) == len(set(names)), names
        assert names.count(CPU) == 1
    assert onnxruntime.get_all_providers()[-1] == CPU
    assert RKNN in onnxruntime.get_all_providers()
    assert onnxruntime.get_available_providers() == rkort.get_available_providers()


def test_uninstall_restores_onnxruntime() -> None:
    before = {n: getattr(onnxruntime, n) for n in install_module._PATCHED_NAMES}
    rkort_listing = rkort.get_available_providers
    rkort.install()
    uninstall()
    uninstall()  # a second call does nothing
    assert not is_installed()
    assert {n: getattr(onnxruntime, n) for n in install_module._PATCHED_NAMES} == before
    assert onnxruntime.InferenceSession is ort_collection.InferenceSession
    assert rkort.get_available_providers is rkort_listing
    assert not any(isinstance(f, install_module._OptimumImportHook) for f in sys.meta_path)


def test_optimum_names_rebound_in_process(installed) -> None:  # type: ignore[no-untyped-def]
    import optimum.onnxruntime.base as base
    import optimum.onnxruntime.modeling as modeling
    import optimum.onnxruntime.utils as utils

    assert modeling.InferenceSession is rkort.InferenceSession
    assert base.InferenceSession is rkort.InferenceSession
    assert base.IOBinding is rkort.IOBinding
    if RKNN in rkort.get_available_providers():
        utils.validate_provider_availability("RKNN")
        base.validate_provider_availability("RKNN")
        utils.validate_provider_availability(RKNN)
    with pytest.raises(ValueError, match="Asked to use RKNNX"):
        utils.validate_provider_availability("RKNNX")
    uninstall()
    assert modeling.InferenceSession is ort_collection.InferenceSession
    assert base.IOBinding is ort_collection.IOBinding
    with pytest.raises(ValueError, match="Asked to use RKNN as"):
        utils.validate_provider_availability("RKNN")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):  # type: ignore[no-untyped-def]
    return models.mlp(tmp_path_factory.mktemp("mlp"))


@needs_rknn
@pytest.mark.parametrize(
    "providers, provider_options",
    [
        (["RKNN"], None),
        ([("RKNN", {"target": "rk3588"}), CPU], None),
        (["RKNN", CPU], [{"target": "rk3588"}, {}]),
    ],
    ids=["name", "tuple", "provider_options"],
)
def test_alias_wherever_onnxruntime_takes_a_provider(
    installed, mlp, cache_dir, providers, provider_options
) -> None:  # type: ignore[no-untyped-def]
    """``onnxruntime.InferenceSession`` itself (patched) takes "RKNN"; the canonical name comes back."""
    sess = onnxruntime.InferenceSession(
        str(mlp.path), providers=providers, provider_options=provider_options
    )
    assert sess.get_providers() == [RKNN, CPU]
    assert RKNN in sess.get_provider_options()
    feed = {"x": mlp.make_feed(0)[0]}
    want = ort_collection.InferenceSession(str(mlp.path), providers=[CPU]).run(None, feed)[0]
    assert hf_models.cosine(sess.run(None, feed)[0], want) >= 0.9999
    # IOBinding(session), as optimum builds it, on a session running on RKNN.
    binding = onnxruntime.IOBinding(sess)
    binding.bind_cpu_input("x", feed["x"])
    binding.bind_output("y")
    sess.run_with_iobinding(binding)
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], sess.run(None, feed)[0])
    sess.set_providers([CPU])
    assert sess.get_providers() == [CPU]


@pytest.fixture(scope="module")
def static_classifier(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cls")
    hf = hf_models.transformers_model("text-classification", root / "hf")
    return hf_models.export(hf, root / "onnx", "text-classification", static=STATIC)


ORDER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    order, path = sys.argv[1], sys.argv[2]
    if order == "install-first":
        import rkort
        rkort.install()
        from optimum.onnxruntime import ORTModelForSequenceClassification
    else:
        from optimum.onnxruntime import ORTModelForSequenceClassification
        import rkort
        rkort.install()
    rkort.install()
    import onnxruntime
    from transformers import AutoTokenizer
    import optimum.onnxruntime.base as base
    import optimum.onnxruntime.modeling as modeling
    import optimum.onnxruntime.modeling_seq2seq as seq2seq
    import optimum.onnxruntime.modeling_decoder as decoder

    model = ORTModelForSequenceClassification.from_pretrained(path, provider="RKNN")
    tok = AutoTokenizer.from_pretrained(path)
    feed = tok(["the cat sat on the mat", "a big red dog ran"], padding="max_length",
               max_length=MAX_LENGTH, return_tensors="np")
    print(json.dumps({
        "isinstance": isinstance(model.model, onnxruntime.InferenceSession),
        "class": type(model.model).__module__ + "." + type(model.model).__qualname__,
        "providers": model.model.get_providers(),
        "provider": model.provider,
        "rebound": {m.__name__: m.InferenceSession is rkort.InferenceSession
                    for m in (base, modeling, seq2seq, decoder)},
        "iobinding": base.IOBinding is rkort.IOBinding,
        "logits": model(**feed).logits.tolist(),
    }))
    """
).replace("MAX_LENGTH", str(STATIC[1]))


@needs_rknn
@pytest.mark.parametrize("order", ["install-first", "optimum-first"])
def test_import_orders(static_classifier, tmp_path, order) -> None:  # type: ignore[no-untyped-def]
    env = dict(os.environ)
    env.pop("RKORT_AUTO", None)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        RKORT_CACHE_DIR=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    p = subprocess.run(
        [sys.executable, "-c", ORDER_SCRIPT, order, str(static_classifier)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["isinstance"]
    assert report["class"] == "rkort.session.InferenceSession"
    assert report["providers"] == [RKNN, CPU]
    assert report["provider"] == RKNN
    assert all(report["rebound"].values()), report["rebound"]
    assert report["iobinding"]

    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(static_classifier)
    feed = tok(
        ["the cat sat on the mat", "a big red dog ran"],
        padding="max_length",
        max_length=STATIC[1],
        return_tensors="np",
    )
    cpu = ORTModelForSequenceClassification.from_pretrained(static_classifier, provider=CPU)
    want = cpu(**feed).logits
    got = np.asarray(report["logits"], np.float32)
    assert hf_models.cosine(got, want) >= 0.9999
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
