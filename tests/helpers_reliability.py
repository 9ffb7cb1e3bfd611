"""Models, child processes and cache checks shared by test_reliability.py and test_fuzz.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rkort.cache import Cache

REPO = Path(__file__).resolve().parent.parent
OPSET = 17


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def ids_model(directory: Path, vocab: int = 64, seq: int = 6, dim: int = 8) -> Path:
    """ids[1, seq] int64 and mask[1, seq] int64 -> hidden[1, seq, dim], pooled[1, dim] float32.

    hidden = (table[ids] * mask) @ proj and pooled = ReduceSum(hidden, axis 1): a BERT-like pair
    of integer inputs whose roles differ, so swapping them changes the answer.
    """
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("MatMul", ["masked", "proj"], ["hidden"]),
        helper.make_node("ReduceSum", ["hidden", "axis1"], ["pooled"], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "table"),
        numpy_helper.from_array((rng.standard_normal((dim, dim)) * 0.3).astype(np.float32), "proj"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    graph = helper.make_graph(
        nodes,
        "ids_pair",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, [1, seq]),
        ],
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, seq, dim]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, dim]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return _save(model, directory / "ids_pair.onnx")


def dynamic_model(directory: Path, features: int = 4, out: int = 3) -> Path:
    """x[batch, features] float32 -> x @ w + b -> Tanh -> y[batch, out]: a symbolic batch dim."""
    rng = np.random.default_rng(12)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["z"]),
        helper.make_node("Tanh", ["z"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((features, out)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((out,)).astype(np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "dynamic_batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return _save(model, directory / "dynamic_batch.onnx")


# -- the cache on disk ----------------------------------------------------------------------


def entry_dirs(root: Path) -> list[Path]:
    """Every directory (or link) at an entry's place in the layout, sound or not."""
    layout = root / "v1"
    if not layout.is_dir():
        return []
    return sorted(p for shard in layout.iterdir() for p in shard.iterdir())


def check_entry(path: Path) -> dict[str, Any]:
    """Independently of rkort.cache: the entry is complete, its blob an RKNN file whose sha256
    and size are the ones meta.json records. Returns the metadata."""
    meta = json.loads((path / "meta.json").read_text())
    blob = (path / "model.rknn").read_bytes()
    assert blob[:4] == b"RKNN", f"{path}: the blob does not start with RKNN"
    assert len(blob) == meta["size"], f"{path}: {len(blob)} bytes, {meta['size']} recorded"
    assert hashlib.sha256(blob).hexdigest() == meta["sha256"], f"{path}: checksum mismatch"
    assert meta["key"] == path.name
    return meta


def rknn_trailer(path: Path) -> dict[str, Any]:
    """The JSON trailer of an .rknn file (target platform, toolkit version, ...)."""
    data = path.read_bytes()
    head = int.from_bytes(data[16:24], "little")
    start = 64 + head
    length = int.from_bytes(data[start : start + 8], "little")
    return dict(json.loads(data[start + 8 : start + 8 + length]))


def only_key(root: Path) -> str:
    (entry,) = entry_dirs(root)
    return entry.name


def cache_files(root: Path) -> list[str]:
    """Files under the cache root except lock files (which stay by design)."""
    return sorted(
        str((Path(d) / f).relative_to(root))
        for d, _, files in os.walk(root)
        for f in files
        if not str(Path(d)).endswith("locks")
    )


def sound(root: Path, key: str) -> bool:
    """Whether rkort's own check accepts the entry."""
    return Cache(root).get(key) is not None


# -- child processes --------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_python(
    script: str, *, env: dict[str, str], timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )


def last_json(stdout: str) -> Any:
    return json.loads(stdout.strip().splitlines()[-1])


def can_mount_tmpfs() -> bool:
    """Whether this user can mount a tmpfs in a private mount namespace (root with CAP_SYS_ADMIN)."""
    unshare = shutil.which("unshare")
    if unshare is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    try:
        p = subprocess.run(
            [unshare, "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt && umount /mnt"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return p.returncode == 0


def in_tmpfs(mountpoint: Path, size: str, command: list[str], *, after: str = "") -> list[str]:
    """``command`` run in a private mount namespace with a tmpfs of ``size`` at ``mountpoint``."""
    shell = f'mount -t tmpfs -o size={size},mode=0700 tmpfs {mountpoint} && {after} exec "$@"'
    return ["unshare", "-m", "sh", "-c", shell, "sh", *command]


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def outcome(fn: Any) -> tuple[str, Any]:
    """("ok", result) or ("raised", (type, message with object addresses removed))."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - the exception is the result compared
        return "raised", (type(e), _ADDRESS.sub(" at 0x?", str(e)))
