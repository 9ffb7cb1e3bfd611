"""The board is the product: warmed caches serve boards, rehearsed here with `rkort run --board`.

Each test warms a cache on this host with `rkort warmup`, then runs an unchanged onnxruntime app
under `rkort run --board SOC`: rkort's real board code path, blobs from the cache only, the
converter out of reach, and RKNNLite's stand-in executing the blobs on the simulator.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from rkort import platform
from rkort.cache import Cache
from tests.conftest import needs_rknn
from tests.encoders import export_encoder

pytestmark = needs_rknn

LENGTHS = (10, 40, 100)
APP = '''
"""An onnxruntime app that knows nothing of rkort but what it reports at the end."""
import json, sys
import numpy as np
import onnxruntime as ort

model, out, lengths = sys.argv[1], sys.argv[2], [int(n) for n in sys.argv[3].split(",")]
options = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
providers = [("RKNNExecutionProvider", options), "CPUExecutionProvider"] if options else None
sess = ort.InferenceSession(model, providers=providers)
names = [i.name for i in sess.get_inputs()]
rng = np.random.default_rng(0)
results = {}
for n in lengths:
    feed = {
        "input_ids": rng.integers(1, 1000, (1, n)).astype(np.int64),
        "attention_mask": np.ones((1, n), np.int64),
    }
    feed = {k: v for k, v in feed.items() if k in names}
    results[f"in{n}"] = feed["input_ids"]
    results[f"out{n}"] = sess.run(None, feed)[0]
np.savez(out + ".npz", **results)
import rkort
with open(out + ".json", "w") as f:
    json.dump(rkort.session_stats(sess), f)
'''


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def rkort(*args: str, cache: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RKORT_CACHE_DIR": str(cache)}
    env.pop("RKORT_BOARD", None)
    return subprocess.run(
        [sys.executable, "-m", "rkort", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        **kw,
    )


def warm(model: Path, cache: Path, *flags: str) -> None:
    done = rkort("warmup", str(model), "-q", *flags, cache=cache)
    assert done.returncode == 0, done.stderr


def rehearse(
    model: Path,
    cache: Path,
    out: Path,
    lengths: Sequence[int] = LENGTHS,
    *,
    board: str = "rk3588",
    run_flags: Sequence[str] = (),
    options: dict[str, str] | None = None,
    python: str = sys.executable,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], dict[str, np.ndarray]]:
    app = out.parent / "app.py"
    app.write_text(APP)
    argv = [python, str(app), str(model), str(out), ",".join(map(str, lengths))]
    if options is not None:
        argv.append(json.dumps(options))
    done = rkort("run", "--board", board, *run_flags, "--", *argv, cache=cache)
    assert done.returncode == 0, done.stderr
    stats = json.loads(out.with_suffix(".json").read_text())
    with np.load(out.with_suffix(".npz")) as data:
        outputs = dict(data)
    return done, stats, outputs


def assert_matches_onnxruntime(model: Path, outputs: dict[str, np.ndarray]) -> None:
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [i.name for i in ref.get_inputs()]
    for key in [k for k in outputs if k.startswith("in")]:
        ids = outputs[key]
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        want = ref.run(None, {k: v for k, v in feed.items() if k in names})[0]
        got = outputs["out" + key[2:]]
        assert got.shape == want.shape
        assert cosine(got, want) >= 0.9999, key


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_encoder("distilbert", tmp_path_factory.mktemp("encoder"), max_len=128)


@pytest.fixture(scope="module")
def warmed(encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("warmed") / "cache"
    warm(encoder, cache, "--buckets", "32,64", "--batch-buckets", "1")
    return cache


def test_a_warmed_cache_serves_the_board(encoder: Path, warmed: Path, tmp_path: Path) -> None:
    """Warm 32 and 64 on the host; on the board lengths 10 and 40 run on the NPU from those
    blobs, 100 (no warmed blob fits) on the CPU with one warning naming the warmup command."""
    done, stats, outputs = rehearse(encoder, warmed, tmp_path / "out")
    assert stats["npu_calls"] == 2 and stats["cpu_calls"] == 1
    assert stats["cpu_reasons"] == {"shape missing from the cache": 1}
    assert stats["compiles"] == 0 and stats["blobs_loaded"] == 2
    assert stats["providers"] == ["RKNNExecutionProvider", "CPUExecutionProvider"]
    (missing,) = stats["missing_shapes"]
    assert missing["shape"] == "input_ids=1x128, attention_mask=1x128"
    assert "--buckets 32,64,128" in missing["warmup"] and "--target rk3588" in missing["warmup"]
    warnings = [line for line in done.stderr.splitlines() if "no compiled blob" in line]
    assert len(warnings) == 1 and "rkort warmup" in warnings[0]
    assert_matches_onnxruntime(encoder, outputs)
    # The report at exit: sessions, calls on the NPU and the CPU with the reasons, what is missing.
    assert "rkort board rehearsal (rk3588): 1 session(s)" in done.stderr
    assert "3 call(s): 2 on the NPU, 1 on the CPU; 0 compile(s), 2 blob(s) loaded" in done.stderr
    assert "CPU x1: shape missing from the cache" in done.stderr
    assert missing["warmup"] in done.stderr


def test_the_converter_is_out_of_reach(encoder: Path, warmed: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib.util, rkort.platform as p\n"
        "try:\n    import rknn.api\n    print('toolkit importable')\n"
        "except ImportError as e:\n    print('no toolkit:', type(e).__name__)\n"
        "print(p.toolkit_version(), p.board_soc(), p.librknnrt_version())\n"
    )
    done = rkort("run", "--board", "rk3576", "--", sys.executable, str(probe), cache=warmed)
    assert done.returncode == 0, done.stderr
    assert "no toolkit: ModuleNotFoundError" in done.stdout
    assert "None rk3576 2.5.0" in done.stdout
    # A compile is refused exactly as on a board without the toolkit.
    refused = rkort(
        "run", "--board", "rk3588", "--", sys.executable, "-m", "rkort", "warmup", str(encoder),
        "--buckets", "16", "--batch-buckets", "1", cache=tmp_path / "empty",
    )  # fmt: skip
    assert refused.returncode == 1
    assert "rknn-toolkit2 cannot be imported" in refused.stderr


def test_an_empty_cache_keeps_the_cpu_and_says_how_to_warm(encoder: Path, tmp_path: Path) -> None:
    done, stats, outputs = rehearse(encoder, tmp_path / "empty", tmp_path / "out", (10,))
    assert stats["providers"] == ["CPUExecutionProvider"]
    assert stats["npu_calls"] == 0 and stats["cpu_calls"] == 1
    (reason,) = stats["cpu_reasons"]
    assert "holds no compiled blob" in reason and "rkort warmup" in reason
    assert_matches_onnxruntime(encoder, outputs)


def test_a_segmented_model_runs_its_recorded_program(tmp_path: Path) -> None:
    """RoBERTa's CumSum stays on the CPU (board runtimes lack it): the board rebuilds the same
    segmented program from the cache's record, trial-build verdicts included, and its NPU segment
    (whose file is long gone) is cut again by the rehearsal to be simulated."""
    model = export_encoder("roberta", tmp_path, max_len=64)
    cache = tmp_path / "cache"
    warm(model, cache, "--buckets", "16", "--batch-buckets", "1")
    records = [r for m in Cache(cache).records.models() for r in Cache(cache).records.all(m)]
    (record,) = [r for r in records if "parts" in r]  # the program record (beside the face)
    assert [p["device"] for p in record["parts"]][:2] == ["cpu", "npu"]
    _, stats, outputs = rehearse(model, cache, tmp_path / "out", (10,))
    assert stats["npu_calls"] == 1 and stats["cpu_calls"] == 0 and stats["compiles"] == 0
    assert_matches_onnxruntime(model, outputs)


def test_a_runtime_older_than_the_blobs_is_named(
    encoder: Path, warmed: Path, tmp_path: Path
) -> None:
    done, stats, outputs = rehearse(
        encoder, warmed, tmp_path / "out", (10,), run_flags=("--librknnrt", "2.3.2")
    )
    assert stats["providers"] == ["CPUExecutionProvider"]
    (reason,) = stats["cpu_reasons"]
    assert "librknnrt is 2.3.2, older than rknn-toolkit2 2.5.0" in reason
    assert_matches_onnxruntime(encoder, outputs)


def _retarget_blob(cache: Path, length: int, soc: str) -> None:
    """Make the warmed blob of one length a blob for another SoC, consistently (its checksum
    recorded anew): the cache serves it, and the board's runtime refuses it."""
    import hashlib

    for entry in Cache(cache).entries():
        if entry.meta["inputs"]["input_ids"] == [1, length]:
            data = entry.blob_path.read_bytes()
            changed = data.replace(
                b'"target_platform": ["rk3588"]', f'"target_platform": ["{soc}"]'.encode()
            )
            if changed == data:
                changed = data.replace(
                    b'"target_platform":["rk3588"]', f'"target_platform":["{soc}"]'.encode()
                )
            assert changed != data and len(changed) == len(data)
            os.chmod(entry.blob_path, 0o600)
            entry.blob_path.write_bytes(changed)
            meta = json.loads((entry.dir / "meta.json").read_text())
            meta["sha256"] = hashlib.sha256(changed).hexdigest()
            (entry.dir / "meta.json").write_text(json.dumps(meta))
            return
    raise AssertionError(f"no warmed blob for length {length}")


def test_a_blob_the_runtime_refuses_is_remembered(encoder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    warm(encoder, cache, "--buckets", "32,64", "--batch-buckets", "1")
    _retarget_blob(cache, 64, "rk3576")
    done, stats, outputs = rehearse(encoder, cache, tmp_path / "out", (10, 40, 50, 60))
    assert stats["providers"] == ["RKNNExecutionProvider", "CPUExecutionProvider"]
    assert stats["npu_calls"] == 1 and stats["cpu_calls"] == 3
    (reason,) = stats["cpu_reasons"]
    assert stats["cpu_reasons"][reason] == 3 and "built for rk3576" in reason
    # Refused once: not loaded again for every call of that shape.
    warned = re.findall(r"could not be opened.*calls of this shape run on the CPU", done.stderr)
    assert len(warned) == 1
    assert_matches_onnxruntime(encoder, outputs)


def test_a_corrupt_blob_is_detected_and_its_calls_use_the_cpu(
    encoder: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    warm(encoder, cache, "--buckets", "32", "--batch-buckets", "1")
    (entry,) = Cache(cache).entries()
    os.chmod(entry.blob_path, 0o600)
    with open(entry.blob_path, "r+b") as f:
        f.seek(entry.size // 2)
        byte = f.read(1)
        f.seek(entry.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    done, stats, outputs = rehearse(encoder, cache, tmp_path / "out", (10,))
    assert "sha256 does not match" in done.stderr
    assert stats["npu_calls"] == 0 and stats["providers"] == ["CPUExecutionProvider"]
    assert_matches_onnxruntime(encoder, outputs)


@pytest.mark.parametrize(
    ("board", "options", "on_npu"),
    [
        ("rk3588", {"core_mask": "0_1_2"}, True),
        ("rk3588", {"core_mask": "2"}, True),
        ("rk3588", {"core_mask": "0_1_2", "contexts": "1"}, True),  # one context on 3 cores
        ("rk3588", {"core_mask": "0_2", "contexts": "1"}, False),  # RK3588 refuses mask 5
    ],
)
def test_core_masks(
    encoder: Path, tmp_path: Path, board: str, options: dict[str, str], on_npu: bool
) -> None:
    cache = tmp_path / "cache"
    warm(encoder, cache, "--buckets", "16", "--batch-buckets", "1", "--target", board)
    _, stats, outputs = rehearse(
        encoder, cache, tmp_path / "out", (10,), board=board, options=options
    )
    assert (stats["npu_calls"] == 1) is on_npu
    if not on_npu:
        assert stats["providers"] == ["CPUExecutionProvider"]
        assert "init_runtime(core_mask=5)" in next(iter(stats["cpu_reasons"]))
    assert_matches_onnxruntime(encoder, outputs)


def test_a_core_the_soc_lacks_is_a_clear_error(encoder: Path, tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        "import sys, onnxruntime as ort\n"
        "try:\n"
        "    ort.InferenceSession(sys.argv[1], providers=[('RKNNExecutionProvider', {'core_mask': '0_1'})])\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    done = rkort(
        "run", "--board", "rk3566", "--", sys.executable, str(app), str(encoder), cache=tmp_path
    )
    assert "InvalidArgument" in done.stdout and "rk3566 does not have (it has 1)" in done.stdout


def test_rkort_env_says_which_cached_blobs_this_board_loads(warmed: Path) -> None:
    for runtime, loadable in (("2.5.0", True), ("2.3.2", False)):
        done = rkort(
            "run", "--board", "rk3588", "--librknnrt", runtime, "--",
            sys.executable, "-m", "rkort", "env", "--json", cache=warmed,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        env = json.loads(done.stdout)
        assert env["machine"] == "board" and env["soc"] == "rk3588"
        assert env["librknnrt"] == runtime and env["rknn_toolkit2"] is None
        assert len(env["blobs"]) == 2
        assert all(b["loadable"] is loadable for b in env["blobs"])
        assert all(b["toolkit"] == "2.5.0" for b in env["blobs"])


def test_board_detection(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RKORT_BOARD", raising=False)
    tree = tmp_path / "compatible"
    tree.write_bytes(b"radxa,rock-5b\0rockchip,rk3588s\0")
    monkeypatch.setattr(platform, "_COMPATIBLE_FILES", (tree,))
    platform._rockchip_socs.cache_clear()
    try:
        assert platform.is_board() and platform.board_soc() == "rk3588"
        monkeypatch.setenv("RKORT_BOARD", "rk3566")  # a container's declaration wins
        assert platform.board_soc() == "rk3566" and platform.default_target() == "rk3566"
        monkeypatch.setenv("RKORT_BOARD", "not-a-soc")
        with pytest.raises(ValueError, match="RKORT_BOARD"):
            platform.board_soc()
    finally:
        platform._rockchip_socs.cache_clear()


ROOT = Path(__file__).resolve().parents[1]
BOARD_PYTHONS = sorted((ROOT / ".venv-board").glob("py3.*/bin/python"))


@pytest.mark.parametrize(
    "python",
    [pytest.param(p, id=p.parts[-3]) for p in BOARD_PYTHONS]
    or [pytest.param(None, marks=pytest.mark.skip(reason="no board venvs (scripts/setup.sh)"))],
)
def test_the_board_path_on_every_board_python(
    python: Path, encoder: Path, warmed: Path, tmp_path: Path
) -> None:
    """Board images run Python 3.9 to 3.12 with only rkort's core install (Python 3.9: the last
    onnxruntime with its wheels, 1.19): the same app, the same calls on the NPU."""
    about = subprocess.run(
        [
            str(python),
            "-c",
            "import sys, onnxruntime, rkort; print(sys.version_info[:2], onnxruntime.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert about.returncode == 0, about.stderr
    assert python.parts[-3].removeprefix("py") == "{}.{}".format(
        *re.findall(r"\d+", about.stdout)[:2]
    )
    _, stats, outputs = rehearse(encoder, warmed, tmp_path / "out", python=str(python))
    assert stats["npu_calls"] == 2 and stats["cpu_calls"] == 1 and stats["compiles"] == 0
    assert_matches_onnxruntime(encoder, outputs)
    env = rkort(
        "run", "--board", "rk3588", "--", str(python), "-m", "rkort", "env", "--json", cache=warmed
    )
    assert env.returncode == 0, env.stderr
    assert json.loads(env.stdout)["machine"] == "board"
