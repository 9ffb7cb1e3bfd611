"""The rkort command, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import rkort
from tests import models
from tests.conftest import RKNN, needs_rknn


def rkort_cli(*args: str, cache: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RKORT_CACHE_DIR": str(cache)}
    p = subprocess.run(
        [sys.executable, "-m", "rkort", *args], capture_output=True, text=True, env=env, timeout=600
    )
    if check:
        assert p.returncode == 0, p.stderr
    return p


@needs_rknn
def test_warmup_compiles_once_then_says_nothing_to_do(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = models.conv_relu(tmp_path)
    cache = tmp_path / "cache"
    first = rkort_cli("warmup", str(m.path), "--target", "rk3588", cache=cache)
    assert "1 compiled, 0 already in the cache" in first.stdout
    assert "compiled" in first.stdout and "rk3588" in first.stdout
    second = rkort_cli("warmup", str(m.path), "--target", "rk3588", cache=cache)
    assert "0 compiled, 1 already in the cache" in second.stdout
    other_target = rkort_cli("warmup", str(m.path), "--target", "rk3566", cache=cache)
    assert "1 compiled" in other_target.stdout
    blobs = list(cache.rglob("model.rknn"))
    assert len(blobs) == 2 and all(b.read_bytes()[:4] == b"RKNN" for b in blobs)
    listing = json.loads(rkort_cli("cache", "list", "--json", cache=cache).stdout)
    assert sorted(r["target"] for r in listing) == ["rk3566", "rk3588"]
    # A session for the same model, shapes and target finds the warmed entry.
    s = rkort.InferenceSession(
        m.path, providers=[(RKNN, {"cache_dir": str(cache), "target": "rk3588"})]
    )
    assert s.get_providers()[0] == RKNN
    assert len(rkort.cache.Cache(cache).entries()) == 2


@needs_rknn
def test_warmup_of_a_dynamic_model_by_buckets_or_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from compat.scenarios import dynamic_batch

    path = tmp_path / "dyn.onnx"
    path.write_bytes(dynamic_batch())
    cache = tmp_path / "cache"
    buckets = rkort_cli("warmup", str(path), "--batch-buckets", "1,2", cache=cache)
    assert (
        "2 compiled" in buckets.stdout and "X=1x4" in buckets.stdout and "X=2x4" in buckets.stdout
    )
    ok = rkort_cli("warmup", str(path), "--shape", "X=8x4", cache=cache)
    assert "X=8x4" in ok.stdout
    bad = rkort_cli("warmup", str(path), "--shape", "X=8x5", cache=cache, check=False)
    assert bad.returncode == 2 and "does not fit" in bad.stderr


def test_warmup_missing_model_gives_onnxruntime_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = rkort_cli("warmup", str(tmp_path / "nofile.onnx"), cache=tmp_path / "c", check=False)
    assert p.returncode == 1
    assert "NO_SUCHFILE" in p.stderr and "Traceback" not in p.stderr


def test_cache_info_prune_clear(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = rkort.cache.Cache(tmp_path / "cache")
    for i in range(3):
        cache.get_or_build(
            rkort.cache.make_key({"i": i}),
            lambda d, i=i: d.write_bytes(b"RKNN" + bytes(1000 * (i + 1))) and None,
            {"model": f"m{i}"},
        )
    info = json.loads(rkort_cli("cache", "info", "--json", cache=cache.root).stdout)
    assert info["entries"] == 3
    assert (
        "removed 0 entries"
        in rkort_cli("cache", "prune", "--older-than", "1d", cache=cache.root).stdout
    )
    pruned = rkort_cli("cache", "prune", "--max-size", "3k", cache=cache.root).stdout
    assert "removed" in pruned
    assert (
        json.loads(rkort_cli("cache", "info", "--json", cache=cache.root).stdout)["bytes"] <= 3072
    )
    assert rkort_cli("cache", "prune", cache=cache.root, check=False).returncode == 2
    rkort_cli("cache", "clear", cache=cache.root)
    assert "is empty" in rkort_cli("cache", "list", cache=cache.root).stdout


def test_env_reports_machine_and_versions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = json.loads(rkort_cli("env", "--json", cache=tmp_path).stdout)
    assert env["machine"] in ("host", "board")
    assert env["onnxruntime"] and env["rkort"] == rkort.__version__
    assert isinstance(env["compatible"], bool) and env["notes"]
    text = rkort_cli("env", cache=tmp_path).stdout
    assert "rknn_toolkit2" in text and "compatible" in text


def test_bad_arguments_are_usage_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = rkort_cli("warmup", "m.onnx", "--shape", "nonsense", cache=tmp_path, check=False)
    assert p.returncode == 2 and "NAME=DIMxDIM" in p.stderr


def test_version_flag(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert rkort.__version__ in rkort_cli("--version", cache=tmp_path).stdout
    np.testing.assert_equal(rkort.__version__.count("."), 2)


@pytest.mark.parametrize(
    "text,expected", [("500M", 500 << 20), ("2G", 2 << 30), ("10k", 10240), ("77", 77)]
)
def test_size_parsing(text: str, expected: int) -> None:
    from rkort.cli import parse_size

    assert parse_size(text) == expected


@needs_rknn
def test_warmup_compiles_the_npu_segments_a_session_uses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import logging

    m = models.cpu_op_at(tmp_path, "middle")
    cache = tmp_path / "cache"
    out = rkort_cli("warmup", str(m.path), "-q", cache=cache).stdout
    assert "2 compiled, 0 already in the cache" in out and out.count(" segment segment-npu-") == 2
    again = rkort_cli("warmup", str(m.path), "-q", cache=cache).stdout
    assert "0 compiled, 2 already in the cache" in again
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("rkort")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        s = rkort.InferenceSession(m.path, providers=[(RKNN, {"cache_dir": str(cache)})])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert s.get_providers()[0] == RKNN
    assert not [r for r in records if r.startswith("compiled ")]
    assert len([r for r in records if r.startswith("using cached blob")]) == 2
