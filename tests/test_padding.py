"""Padding proven, not guessed: a dim is padded to buckets only where a probe on onnxruntime
shows that padding keeps the valid part of every output; elsewhere it is compiled per size, and
`rkort inspect` says why. Additive float masks get a pad value that masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rkort
from rkort import padding
from rkort.cache import Cache
from rkort.model import ModelSource
from rkort.options import RKNNOptions
from tests.conftest import RKNN, needs_rknn
from tests.rehearsal import rehearse_in_process

B, S = "batch", "seq"
VOCAB, H = 50, 16


def _save(path: Path, nodes, inputs, outputs, inits) -> Path:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _tokens_model(path: Path, kind: str) -> Path:
    """ids [batch, seq] and attention_mask [batch, seq] -> out.

    - ``meanpool``: mean over every position, the mask never read (padding changes it);
    - ``masked``: mean over the positions the mask keeps (padding is harmless);
    - ``conv``: a convolution over the tokens (the last real token sees the padding).
    """
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, H)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.standard_normal((H, H)).astype(np.float32) * 0.3, "w"),
    ]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, S])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, S])
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("MatMul", ["emb", "w"], ["h"]),
    ]
    if kind == "meanpool":
        nodes.append(helper.make_node("ReduceMean", ["h"], ["out"], axes=[1], keepdims=0))
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, H])
    elif kind == "masked":
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "two"], ["m3"]),
            helper.make_node("Mul", ["h", "m3"], ["hm"]),
            helper.make_node("ReduceSum", ["hm", "one"], ["total"], keepdims=0),
            helper.make_node("ReduceSum", ["m", "one"], ["count"], keepdims=1),
            helper.make_node("Div", ["total", "count"], ["out"]),
        ]
        inits.append(numpy_helper.from_array(np.array([2], np.int64), "two"))
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, H])
    else:
        inits.append(
            numpy_helper.from_array(rng.standard_normal((H, H, 3)).astype(np.float32), "k")
        )
        nodes += [
            helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
            helper.make_node("Conv", ["ht", "k"], ["c"], pads=[1, 1]),
            helper.make_node("Transpose", ["c"], ["out"], perm=[0, 2, 1]),
        ]
        out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, S, H])
    return _save(path, nodes, [ids, mask], [out], inits)


def _additive_mask_model(path: Path) -> Path:
    """x [batch, seq, 8] and an additive float mask [batch, seq] (0 keeps, -10000 drops) ->
    self-attention of x over the kept positions."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, 8])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, [B, S])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, S, 8])
    inits = [numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["scores"]),
        helper.make_node("Unsqueeze", ["attention_mask", "one"], ["m"]),
        helper.make_node("Add", ["scores", "m"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["out"]),
    ]
    return _save(path, nodes, [x, mask], [out], inits)


def _policy(path: Path, cache: Path, **options: str):  # type: ignore[no-untyped-def]
    cpu = ort.InferenceSession(str(path))
    return padding.make_policy(
        ModelSource(path),
        cpu.get_inputs(),
        cpu.get_outputs(),
        RKNNOptions.parse(options),
        Cache(cache),
    )


def _feed(n: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(1, VOCAB, (n, length)).astype(np.int64),
        "attention_mask": np.ones((n, length), np.int64),
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_probe_tells_harmless_padding_from_harmful(tmp_path: Path) -> None:
    masked = _policy(_tokens_model(tmp_path / "masked.onnx", "masked"), tmp_path / "c")
    assert masked.kind == {B: "batch", S: "sequence"}
    assert "gave onnxruntime's unpadded result" in masked.reasons[S]
    for kind in ("meanpool", "conv"):
        policy = _policy(_tokens_model(tmp_path / f"{kind}.onnx", kind), tmp_path / "c")
        assert policy.kind[S] == "exact", kind
        assert "changes the valid part of output 'out'" in policy.reasons[S]
        assert policy.kind[B] == "batch"  # rows stay independent in both


def test_an_additive_mask_is_padded_with_a_value_that_masks(tmp_path: Path) -> None:
    path = _additive_mask_model(tmp_path / "additive.onnx")
    policy = _policy(path, tmp_path / "c")
    assert policy.kind[S] == "sequence"
    assert policy.pad_values[policy.input_names.index("attention_mask")] == -10000.0
    assert "padded with -10000 (additive)" in policy.reasons[S]
    # A pad value the user gives is theirs: with 0 the proof fails and the dim is exact.
    given = _policy(path, tmp_path / "c", pad_values="attention_mask=0")
    assert given.kind[S] == "exact"


def test_the_verdict_is_kept_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _tokens_model(tmp_path / "meanpool.onnx", "meanpool")
    runs: list[str] = []
    real = padding._prove

    def counted(policy, *args):  # type: ignore[no-untyped-def]
        runs.append(policy.input_names[0])
        return real(policy, *args)

    monkeypatch.setattr(padding, "_prove", counted)
    first = _policy(path, tmp_path / "c")
    second = _policy(path, tmp_path / "c")
    assert len(runs) == 1
    assert (first.kind, first.reasons) == (second.kind, second.reasons)
    _policy(path, tmp_path / "other")  # another cache proves again
    assert len(runs) == 2


@needs_rknn
def test_unsafe_padding_gives_onnxruntimes_answer(tmp_path: Path) -> None:
    """The issue's case: mean-pooling without the mask gave cosine 0.17 when padded."""
    path = _tokens_model(tmp_path / "meanpool.onnx", "meanpool")
    ref = ort.InferenceSession(str(path))
    sess = rkort.InferenceSession(
        path, providers=[(RKNN, {"cache_dir": str(tmp_path / "c")}), "CPUExecutionProvider"]
    )
    for length in (3, 7):
        feed = _feed(2, length, length)
        got, want = sess.run(None, feed)[0], ref.run(None, feed)[0]
        assert _cosine(got, want) > 0.999
    stats = rkort.session_stats(sess)
    assert stats["npu_calls"] == 2 and stats["cpu_calls"] == 0


@needs_rknn
def test_an_additive_mask_session_matches_onnxruntime(tmp_path: Path) -> None:
    path = _additive_mask_model(tmp_path / "additive.onnx")
    ref = ort.InferenceSession(str(path))
    sess = rkort.InferenceSession(
        path,
        providers=[
            (RKNN, {"cache_dir": str(tmp_path / "c"), "buckets": "16"}),
            "CPUExecutionProvider",
        ],
    )
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 6), np.float32)
    mask[0, 4:] = -10000.0  # the model's own masking, inside the real length
    feed = {"x": rng.standard_normal((1, 6, 8)).astype(np.float32), "attention_mask": mask}
    got, want = sess.run(None, feed)[0], ref.run(None, feed)[0]
    assert got.shape == want.shape == (1, 6, 8)
    assert _cosine(got, want) > 0.999
    assert rkort.session_stats(sess)["npu_calls"] == 1


@needs_rknn
def test_inspect_says_why_a_dim_is_not_padded(tmp_path: Path) -> None:
    path = _tokens_model(tmp_path / "conv.onnx", "conv")
    env_cache = {"RKORT_CACHE_DIR": str(tmp_path / "c")}
    out = subprocess.run(
        [sys.executable, "-m", "rkort", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env_cache},
    )
    dims = json.loads(out.stdout)["dims"]
    assert dims[S]["kind"] == "exact"
    assert "changes the valid part of output 'out'" in dims[S]["reason"]
    assert dims[B]["kind"] == "batch"
    text = subprocess.run(
        [sys.executable, "-m", "rkort", "inspect", str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env_cache},
    ).stdout
    assert f"dim '{S}': compiled per size: padding '{S}' changes the valid part" in text


@needs_rknn
def test_a_board_reads_the_verdict_from_the_warmed_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _tokens_model(tmp_path / "masked.onnx", "masked")
    cache = tmp_path / "c"
    warm = subprocess.run(
        [
            sys.executable,
            "-m",
            "rkort",
            "warmup",
            str(path),
            "--buckets",
            "16",
            "--batch-buckets",
            "2",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "RKORT_CACHE_DIR": str(cache)},
    )
    assert warm.returncode == 0, warm.stderr
    monkeypatch.setattr(padding, "_prove", _refuse)
    with rehearse_in_process("rk3588", tmp_path):
        sess = rkort.InferenceSession(
            path,
            providers=[
                (RKNN, {"cache_dir": str(cache), "buckets": "16", "batch_buckets": "2"}),
                "CPUExecutionProvider",
            ],
        )
        feed = _feed(2, 9, 0)
        got = sess.run(None, feed)[0]
        stats = rkort.session_stats(sess)
    assert stats["npu_calls"] == 1 and stats["compiles"] == 0
    want = ort.InferenceSession(str(path)).run(None, feed)[0]
    assert _cosine(got, want) > 0.999


def _refuse(*args: object) -> None:
    raise AssertionError("the board ran the padding probe although the cache had its verdict")
