"""Memory and warm start: a model the NPU runs whole keeps no onnxruntime session of the whole
model and no parsed graph; a session on a warmed cache opens without parsing the ONNX file or
re-hashing blobs it verified before; segment files go once loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import rkort
from rkort.capi.onnxruntime_pybind11_state import InvalidArgument
from rkort.model import ModelSource
from tests import models
from tests.conftest import RKNN, needs_rknn
from tests.rehearsal import rehearse_in_process

pytestmark = needs_rknn


def _session(path: Path, cache: Path, **options: str) -> rkort.InferenceSession:
    return rkort.InferenceSession(
        path, providers=[(RKNN, {"cache_dir": str(cache), **options}), "CPUExecutionProvider"]
    )


def _same_face(a: ort.InferenceSession, b: ort.InferenceSession) -> None:
    for x, y in zip(
        a.get_inputs() + a.get_outputs() + a.get_overridable_initializers(),
        b.get_inputs() + b.get_outputs() + b.get_overridable_initializers(),
    ):
        assert (x.name, x.type, x.shape) == (y.name, y.type, y.shape)
    ma, mb = a.get_modelmeta(), b.get_modelmeta()
    for field in (
        "custom_metadata_map",
        "description",
        "domain",
        "graph_name",
        "producer_name",
        "version",
    ):
        assert getattr(ma, field) == getattr(mb, field), field


def test_a_model_on_the_npu_keeps_only_its_face(tmp_path: Path) -> None:
    m = models.mlp(tmp_path)
    ref = ort.InferenceSession(str(m.path))
    for _ in range(2):  # the first session records the face, the second opens on it
        sess = _session(m.path, tmp_path / "cache")
        assert sess.get_providers() == [RKNN, "CPUExecutionProvider"]
        assert not sess._whole  # onnxruntime holds the face, not the model
        assert "proto" not in sess._source.__dict__  # nor is the graph kept parsed
        _same_face(sess, ref)
    feed = dict(zip(m.input_names, m.make_feed(0)))
    np.testing.assert_allclose(sess.run(None, feed)[0], ref.run(None, feed)[0], atol=1e-2)
    # onnxruntime's own errors, from the face.
    with pytest.raises(InvalidArgument, match="Unexpected input data type"):
        sess.run(None, {"x": feed["x"].astype(np.float64)})
    with pytest.raises(ValueError, match="Required inputs"):
        sess.run(None, {})
    # A call that must run on the CPU loads the whole model, once.
    huge = {"x": np.full_like(feed["x"], 1e6)}
    np.testing.assert_array_equal(sess.run(None, huge)[0], ref.run(None, huge)[0])
    assert sess._whole
    assert rkort.session_stats(sess)["cpu_calls"] == 1


def test_sessions_of_a_warmed_model_share_one_face_session(tmp_path: Path) -> None:
    """Re-opening a warmed model creates no onnxruntime session (nor its thread pool): sessions
    without session options of their own share one face session; a session with its own
    options keeps its own; a session that loads the whole model leaves the others alone."""
    m = models.mlp(tmp_path)
    ref = ort.InferenceSession(str(m.path))
    _session(m.path, tmp_path / "cache")  # records the face
    a, b = _session(m.path, tmp_path / "cache"), _session(m.path, tmp_path / "cache")
    assert a._sess is b._sess and not a._whole and not b._whole
    _same_face(b, ref)
    assert a.get_session_options().intra_op_num_threads == 0  # onnxruntime's default
    a.get_providers().append("not shared")  # each session's answers are its own
    assert b.get_providers() == [RKNN, "CPUExecutionProvider"]

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    own = rkort.InferenceSession(
        m.path,
        options,
        providers=[(RKNN, {"cache_dir": str(tmp_path / "cache")}), "CPUExecutionProvider"],
    )
    assert own._sess is not a._sess and not own._whole
    assert own.get_session_options().intra_op_num_threads == 1
    _same_face(own, ref)

    feed = dict(zip(m.input_names, m.make_feed(0)))
    huge = {"x": np.full_like(feed["x"], 1e6)}
    np.testing.assert_array_equal(a.run(None, huge)[0], ref.run(None, huge)[0])  # on the CPU
    assert a._whole and a._sess is not b._sess and not b._whole
    np.testing.assert_allclose(b.run(None, feed)[0], ref.run(None, feed)[0], atol=1e-2)
    assert rkort.session_stats(b)["npu_calls"] == 1
    with pytest.raises(ValueError, match="Required inputs"):
        b.run(None, {})


def test_a_warm_open_reads_the_model_hash_memo_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rkort import files

    m = models.mlp(tmp_path)
    monkeypatch.setattr("rkort.cache.hashes._RACY_WINDOW_S", 0.0)
    _session(m.path, tmp_path / "cache")
    reads: list[str] = []
    real = files.read_json

    def counting(path: Path, *args: object) -> object:
        reads.append(str(path))
        return real(path, *args)

    monkeypatch.setattr(files, "read_json", counting)
    _session(m.path, tmp_path / "cache")
    assert not [r for r in reads if "/hashes/" in r]
    # A changed model is hashed again (its stamp changed), not answered from memory.
    before = ModelSource(m.path).content_hash(rkort.cache.Cache(tmp_path / "cache"))
    proto = onnx.load(m.path)
    proto.doc_string = "changed"
    onnx.save(proto, m.path)
    after = ModelSource(m.path).content_hash(rkort.cache.Cache(tmp_path / "cache"))
    assert after != before


def test_io_binding_made_on_the_face_works_after_the_model_loads(tmp_path: Path) -> None:
    m = models.mlp(tmp_path)
    _session(m.path, tmp_path / "cache")
    sess = _session(m.path, tmp_path / "cache")
    assert not sess._whole
    x = m.make_feed(0)[0]
    binding = sess.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_output("y")
    sess.run_with_iobinding(binding)
    want = ort.InferenceSession(str(m.path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], want, atol=1e-2)
    # A binding onnxruntime itself must run (an output bound to a buffer of its own).
    out = ort.OrtValue.ortvalue_from_numpy(np.zeros_like(want))
    opaque = sess.io_binding()
    opaque.bind_cpu_input("x", x)
    opaque.bind_output("y", "cpu", 0, np.float32, list(want.shape), out.data_ptr())
    sess.run_with_iobinding(opaque)
    assert sess._whole
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5)


def test_a_warm_board_open_never_parses_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = models.mlp(tmp_path)
    with rehearse_in_process("rk3588", tmp_path):
        _session(m.path, tmp_path / "cache").run(None, dict(zip(m.input_names, m.make_feed(0))))

        # Now the graph must not be read: the cache has the face, the record and the blob.
        def refuse(self: ModelSource) -> None:
            raise AssertionError("the warmed session parsed the ONNX file")

        monkeypatch.setattr(ModelSource, "proto", property(refuse))
        monkeypatch.setattr(
            ort.InferenceSession,
            "_create_inference_session",
            _only_small(ort.InferenceSession._create_inference_session),
        )
        sess = _session(m.path, tmp_path / "cache")
        feed = dict(zip(m.input_names, m.make_feed(1)))
        out = sess.run(None, feed)[0]
        assert rkort.session_stats(sess)["blobs_loaded"] == 1
        # Opening it again creates no onnxruntime session: it shares the face session.
        created: list[object] = []
        monkeypatch.setattr(
            ort.InferenceSession,
            "_create_inference_session",
            lambda self, *a, **k: created.append(self),
        )
        again = _session(m.path, tmp_path / "cache")
        assert not created and again._sess is sess._sess
        np.testing.assert_array_equal(again.run(None, feed)[0], out)
        assert [i.name for i in again.get_inputs()] == list(m.input_names)
    monkeypatch.undo()
    np.testing.assert_allclose(out, ort.InferenceSession(str(m.path)).run(None, feed)[0], atol=1e-2)


def _only_small(create):  # type: ignore[no-untyped-def]
    """onnxruntime may load a face (a few hundred bytes), never a model file."""

    def guarded(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        assert self._model_path is None and len(self._model_bytes) < 10_000, "loaded the model"
        return create(self, *args, **kwargs)

    return guarded


def test_a_verified_blob_is_not_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rkort import files
    from rkort.cache import Cache

    m = models.mlp(tmp_path)
    with rehearse_in_process("rk3588", tmp_path):
        _session(m.path, tmp_path / "cache")
        (entry,) = Cache(tmp_path / "cache").entries()
        # Blobs changed within the last 2 s are hashed again (their stat could hide a change);
        # this one was just written.
        monkeypatch.setattr("rkort.cache.entry._RACY_S", 0.0)
        reads: list[int] = []
        real = files.sha256_fd

        def counting(fd: int) -> str:
            reads.append(fd)
            return real(fd)

        monkeypatch.setattr("rkort.cache.entry.sha256_fd", counting)
        for _ in range(3):
            _session(m.path, tmp_path / "cache")
        assert len(reads) == 1  # verified once, then known by its file identity
        with open(entry.blob_path, "r+b") as f:  # a changed blob is hashed (and refused) again
            f.seek(100)
            f.write(b"\x00\x01")
        sess = _session(m.path, tmp_path / "cache")
        assert len(reads) > 1  # the changed blob was read, refused, and rebuilt
        assert rkort.session_stats(sess)["compiles"] == 1


def test_segment_files_go_once_loaded(tmp_path: Path) -> None:
    m = models.cpu_islands(tmp_path)
    sess = _session(m.path, tmp_path / "cache")
    assert sess.get_providers()[0] == RKNN
    directory = sess._rknn.planner._directory
    assert directory is not None and list(directory.glob("*.onnx")) == []
    feed = dict(zip(m.input_names, m.make_feed(0)))
    want = ort.InferenceSession(str(m.path)).run(None, feed)
    for got, w in zip(sess.run(None, feed), want):
        np.testing.assert_allclose(got, w, atol=2e-2)
