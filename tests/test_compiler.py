"""compile_blob with the real rknn-toolkit2 in a real child process: blobs, noise, failures, crashes."""

from __future__ import annotations

import json
import logging
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

from rkort.compiler import (
    BuildFailed,
    BuildSpec,
    CompileError,
    CompileTimeout,
    ConverterCrashed,
    ToolkitNotInstalled,
    compile_blob,
    toolkit_version,
)
from tests import models

needs_toolkit = pytest.mark.skipif(
    toolkit_version() is None, reason="rknn-toolkit2 is not installed"
)


spec_of = models.spec_of


def float_spec(path: Path, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> BuildSpec:
    return BuildSpec(str(path), ("x",), (shape,), ("float32",), ("y",), (out_shape,), ("float32",))


def blob_trailer(blob: bytes) -> dict:
    """The JSON after the blob's flatbuffer (layout in reference/rknn-toolkit-facts.md)."""
    flatbuffer_len = struct.unpack_from("<Q", blob, 16)[0]
    at = 64 + flatbuffer_len
    json_len = struct.unpack_from("<Q", blob, at)[0]
    return json.loads(blob[at + 8 : at + 8 + json_len])


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temp root (so the test sees the child's working directory) and an empty cwd."""
    (tmp_path / "tmp").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def assert_no_leftovers(scratch: Path, dest: Path) -> None:
    assert list((scratch / "tmp").iterdir()) == [], "the child's working directory was left behind"
    assert list((scratch / "cwd").iterdir()) == [], "the toolkit wrote into the caller's cwd"
    assert [p.name for p in dest.parent.glob(".*.part")] == []


# -- BuildSpec (no toolkit needed) ----------------------------------------------------------------


def test_key_parts_change_with_everything_that_changes_the_blob(tmp_path: Path) -> None:
    model = models.mlp(tmp_path)
    base = spec_of(model)
    assert base.key_parts() == spec_of(model).key_parts()
    assert json.dumps(base.key_parts(), sort_keys=True)  # JSON-able, for the cache key
    variants = [
        spec_of(model, target="rk3566"),
        spec_of(model, input_shapes=((4, 16),)),
        spec_of(model, optimization_level=2),
        spec_of(model, output_names=("h",)),
    ]
    keys = {json.dumps(s.key_parts(), sort_keys=True) for s in [base, *variants]}
    assert len(keys) == 1 + len(variants)
    # The model's location is not part of the key (its content is, added by the caller).
    moved = spec_of(model, model_path=str(tmp_path / "elsewhere.onnx"))
    assert moved.key_parts() == base.key_parts()


def test_key_parts_follow_the_calibration_samples_content(tmp_path: Path) -> None:
    model = models.mlp(tmp_path)
    np.save(tmp_path / "s0.npy", model.make_feed(0)[0])
    (tmp_path / "dataset.txt").write_text("s0.npy\n")
    spec = spec_of(model, quantized_dtype="w8a8", dataset=str(tmp_path / "dataset.txt"))
    before = spec.key_parts()
    np.save(tmp_path / "s0.npy", model.make_feed(1)[0])
    assert spec.key_parts()["dataset"] != before["dataset"]


def test_build_spec_refuses_what_the_toolkit_would(tmp_path: Path) -> None:
    model = models.mlp(tmp_path)
    with pytest.raises(ValueError, match="target"):
        spec_of(model, target="rk1808")
    with pytest.raises(ValueError, match="dataset"):
        spec_of(model, quantized_dtype="w8a8")
    with pytest.raises(ValueError, match="length"):
        spec_of(model, input_dtypes=("float32", "int64"))
    assert spec_of(model, target="RK3588").target == "rk3588"
    listed = spec_of(model, input_shapes=[[2, 16]])
    assert listed.input_shapes == ((2, 16),) and hash(listed) == hash(spec_of(model))


# -- real builds -----------------------------------------------------------------------------------


@needs_toolkit
def test_compile_writes_a_blob_quietly(
    scratch: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    model = models.mlp(scratch / "models")
    dest = scratch / "cache" / "mlp.rknn"
    caplog.set_level(logging.DEBUG, logger="rkort.toolkit")

    info = compile_blob(spec_of(model), dest)

    blob = dest.read_bytes()
    assert blob[:4] == b"RKNN"
    trailer = blob_trailer(blob)
    assert trailer["target_platform"] == ["rk3588"]
    assert trailer["version"] == toolkit_version() == info["toolkit_version"]
    assert info["build_seconds"] > 0 and info["blob_bytes"] == len(blob)
    out, err = capfd.readouterr()
    assert out == "" and err == "", "toolkit output reached the test process's stdout/stderr"
    toolkit_lines = [r.getMessage() for r in caplog.records if r.name == "rkort.toolkit"]
    assert any("rknn-toolkit2 version" in line for line in toolkit_lines)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "rkort.toolkit")
    assert_no_leftovers(scratch, dest)


@needs_toolkit
def test_compile_for_another_target_names_it(scratch: Path) -> None:
    model = models.conv_relu(scratch / "models")
    dest = scratch / "cache" / "conv.rknn"
    compile_blob(spec_of(model, target="rk3566"), dest, progress=False)
    assert blob_trailer(dest.read_bytes())["target_platform"] == ["rk3566"]


@needs_toolkit
def test_nonzero_is_a_build_failure_with_the_toolkits_reason(scratch: Path) -> None:
    path = models.nonzero(scratch / "models")
    dest = scratch / "cache" / "nonzero.rknn"
    with pytest.raises(BuildFailed) as caught:
        compile_blob(float_spec(path, (4,), (1, 4)), dest)
    message = str(caught.value)
    assert "NonZero('y') need to be constant" in message
    assert "nonzero.onnx" in message and "rk3588" in message
    assert caught.value.stage == "building"
    assert "\n" not in message
    assert not dest.exists()
    assert_no_leftovers(scratch, dest)


@needs_toolkit
def test_opset_20_is_a_build_failure_at_loading(scratch: Path) -> None:
    path = models.relu_opset20(scratch / "models")
    with pytest.raises(BuildFailed, match="opset 20") as caught:
        compile_blob(float_spec(path, (1, 4), (1, 4)), scratch / "cache" / "r.rknn")
    assert caught.value.stage == "loading"
    assert any("opset 20" in line for line in caught.value.toolkit_errors)


@needs_toolkit
def test_unknown_output_name_is_a_build_failure(scratch: Path) -> None:
    model = models.mlp(scratch / "models")
    with pytest.raises(BuildFailed, match="nope"):
        compile_blob(spec_of(model, output_names=("nope",)), scratch / "cache" / "x.rknn")


@needs_toolkit
def test_converter_abort_is_reported_and_the_caller_lives(scratch: Path) -> None:
    # A w8a8 conv for rk2118 makes rknn-toolkit2 2.5.0 abort the process (SIGABRT) while building.
    model = models.conv_relu(scratch / "models")
    np.save(scratch / "models" / "sample.npy", model.make_feed(0)[0])
    (scratch / "models" / "dataset.txt").write_text("sample.npy\n")  # relative to the dataset file
    spec = spec_of(
        model,
        target="rk2118",
        quantized_dtype="w8a8",
        dataset=str(scratch / "models" / "dataset.txt"),
    )
    dest = scratch / "cache" / "crash.rknn"
    with pytest.raises(ConverterCrashed) as caught:
        compile_blob(spec, dest)
    message = str(caught.value)
    assert "SIGABRT" in message and "building" in message
    assert "unsupported conv" in message  # the toolkit's last words
    assert not dest.exists()
    assert_no_leftovers(scratch, dest)
    # This process is fine and can build again.
    compile_blob(spec_of(models.mlp(scratch / "models")), scratch / "cache" / "ok.rknn")


@needs_toolkit
def test_toolkit_that_cannot_be_imported(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shadow the toolkit with a package that has no rknn.api: the child really cannot import it.
    shadow = scratch / "shadow"
    (shadow / "rknn").mkdir(parents=True)
    (shadow / "rknn" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(shadow))
    model = models.mlp(scratch / "models")
    with pytest.raises(ToolkitNotInstalled, match=r"rknn\.api") as caught:
        compile_blob(spec_of(model), scratch / "cache" / "x.rknn")
    assert "rkort[compile]" in str(caught.value)
    assert isinstance(caught.value, CompileError)


@needs_toolkit
def test_timeout_stops_the_conversion(scratch: Path) -> None:
    model = models.mlp(scratch / "models")
    dest = scratch / "cache" / "slow.rknn"
    with pytest.raises(CompileTimeout, match="did not finish within"):
        compile_blob(spec_of(model), dest, timeout=0.01)
    assert not dest.exists()
    assert_no_leftovers(scratch, dest)
