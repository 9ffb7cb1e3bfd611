"""One contract for every backend: the same models, the same checks, against onnxruntime.

On a host this runs "cpu", "simulator" and "board" (rknn-toolkit-lite2's RKNNLite on a rehearsed
rk3588: rkort's board backend, line for line, over the rehearsal's stand-in, which executes the
blobs on the simulator); on a Rockchip board "board" is the real NPU. "adb" (a board over adb)
gets the same tests where available. Set RKORT_TEST_TARGET to the adb board's SoC when it is not
an rk3588.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime
import pytest

from rkort import platform
from rkort.backends import Runner, RunnerClosed, RunnerError, available_backends
from rkort.cache import Cache, make_key
from rkort.compiler import BuildFailed, BuildSpec, compile_blob
from rkort.spec import build_recipe
from tests import models
from tests.rehearsal import rehearse_in_process

BACKENDS = ("board", "simulator", "adb", "cpu")
NPU_BACKENDS = ("board", "simulator", "adb")
WHY_NOT = {
    "board": "not a Rockchip board with rknn-toolkit-lite2, and no rknn-toolkit2 to rehearse one",
    "simulator": "rknn-toolkit2 is not installed",
    "adb": "no adb device listed (or rknn-toolkit2 or adb missing)",
    "cpu": "onnxruntime is not installed",
}


def spec_of(model: models.TestModel, target: str) -> BuildSpec:
    return models.spec_of(model, target=target)


def target_for(backend: str) -> str:
    if backend == "board":
        return platform.default_target()
    return os.environ.get("RKORT_TEST_TARGET", "rk3588")


def open_runner(backend: str, model: models.TestModel, blob_dir: Path) -> Runner:
    spec = spec_of(model, target_for(backend))
    if backend == "cpu":
        from rkort.backends.cpu import open_cpu

        return open_cpu(spec)
    if backend == "simulator":
        from rkort.backends.simulator import open_simulator

        return open_simulator(spec)
    if backend == "board":
        from rkort.backends.board import open_board

        # Through a cache, as sessions do: the entry records what the blob is built from.
        cache = Cache(blob_dir / "board-cache")
        entry, _ = cache.get_or_build(
            make_key({"contract": model.name, **spec.key_parts()}),
            lambda dest: compile_blob(spec, dest),
            {"source": build_recipe(spec)},
        )
        return open_board(entry.blob_path, spec)
    blob = blob_dir / f"{model.name}-{spec.target}.rknn"
    if not blob.exists():
        compile_blob(spec, blob)
    from rkort.backends.adb import list_devices, open_adb

    return open_adb(blob, spec, spec.target, list_devices()[0])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def test_models(model_dir: Path) -> dict[str, models.TestModel]:
    return {name: build(model_dir) for name, build in models.RUNNABLE.items()}


@pytest.fixture(scope="module", autouse=True)
def rehearsed_board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """On a host with the converter, the board backend runs over the rehearsal's stand-in."""
    if platform.is_board() or platform.toolkit_version() is None:
        yield
        return
    with rehearse_in_process("rk3588", tmp_path_factory.mktemp("librknnrt")):
        yield


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, rehearsed_board: None) -> str:
    if request.param not in available_backends():
        pytest.skip(f"{request.param} backend unavailable here: {WHY_NOT[request.param]}")
    return str(request.param)


@pytest.fixture(scope="module")
def shared_runners(
    model_dir: Path, test_models: dict[str, models.TestModel]
) -> Iterator[Callable[[str, str], Runner]]:
    """Runners reused across tests (a simulator worker costs a toolkit start and a build)."""
    opened: dict[tuple[str, str], Runner] = {}

    def get(backend: str, name: str) -> Runner:
        if (backend, name) not in opened:
            opened[(backend, name)] = open_runner(backend, test_models[name], model_dir)
        return opened[(backend, name)]

    yield get
    for runner in opened.values():
        runner.close()


def reference(model: models.TestModel, feed: list[np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    return session.run(list(model.output_names), dict(zip(model.input_names, feed)))


def assert_close(backend: str, got: np.ndarray, want: np.ndarray, what: str) -> None:
    got32 = np.asarray(got, dtype=np.float64).ravel()
    want32 = np.asarray(want, dtype=np.float64).ravel()
    if backend == "cpu":
        np.testing.assert_allclose(got32, want32, rtol=1e-6, atol=1e-6, err_msg=what)
        return
    cosine = got32 @ want32 / (np.linalg.norm(got32) * np.linalg.norm(want32))
    assert cosine >= 0.9999, f"{what}: cosine {cosine}"
    # The NPU computes in float16: about 3 significant digits, errors growing with magnitude.
    scale = max(1.0, float(np.abs(want32).max()))
    np.testing.assert_allclose(got32, want32, rtol=1e-2, atol=1e-2 * scale, err_msg=what)


MODEL_NAMES = list(models.RUNNABLE)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_outputs_have_declared_shapes_and_match_onnxruntime(
    backend: str,
    name: str,
    shared_runners: Callable[[str, str], Runner],
    test_models: dict[str, models.TestModel],
) -> None:
    model = test_models[name]
    runner = shared_runners(backend, name)
    assert runner.name == backend
    for seed in (0, 1):
        feed = model.make_feed(seed)
        outputs = runner.run(feed)
        assert len(outputs) == len(model.output_names)
        for out, want, shape, out_name in zip(
            outputs, reference(model, feed), model.output_shapes, model.output_names
        ):
            assert isinstance(out, np.ndarray)
            assert out.shape == shape, f"{out_name}: shape {out.shape}, declared {shape}"
            assert_close(backend, out, want, f"{backend} {name} {out_name} seed {seed}")


@pytest.mark.parametrize("name", ["mlp", "two_in_two_out"])
def test_threads_get_the_same_results_as_serial_runs(
    backend: str,
    name: str,
    shared_runners: Callable[[str, str], Runner],
    test_models: dict[str, models.TestModel],
) -> None:
    model = test_models[name]
    runner = shared_runners(backend, name)
    feeds = [model.make_feed(seed) for seed in range(6)]
    serial = [runner.run(feed) for feed in feeds]
    results: dict[tuple[int, int], list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for rep in range(3):
                for i, feed in enumerate(feeds):
                    results[(thread, rep * len(feeds) + i)] = runner.run(feed)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a run hung"
    assert errors == []
    assert len(results) == 4 * 3 * len(feeds)
    for (_, k), outputs in results.items():
        for got, want in zip(outputs, serial[k % len(feeds)]):
            np.testing.assert_array_equal(got, want)


def test_wrong_number_of_inputs_is_refused(
    backend: str, shared_runners: Callable[[str, str], Runner]
) -> None:
    runner = shared_runners(backend, "two_in_two_out")
    with pytest.raises(ValueError, match="expects 2 inputs"):
        runner.run([np.zeros((1, 2, 3, 4), np.float32)])


def test_close_is_idempotent_and_run_after_close_is_clear(
    backend: str, test_models: dict[str, models.TestModel], model_dir: Path
) -> None:
    model = test_models["mlp"]
    with open_runner(backend, model, model_dir) as runner:
        runner.run(model.make_feed(0))
    assert runner.closed
    runner.close()
    runner.close()
    with pytest.raises(RunnerClosed, match="closed"):
        runner.run(model.make_feed(0))
    assert isinstance(RunnerClosed("x"), RuntimeError)


def run_with_hang_guard(runner: Runner, feed: list[np.ndarray]) -> BaseException | None:
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            runner.run(feed)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - returned to the test
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "run() hung after the worker died"
    return outcome[0]


def test_killed_worker_gives_a_clear_error_not_a_hang(
    backend: str, test_models: dict[str, models.TestModel], model_dir: Path
) -> None:
    model = test_models["mlp"]
    runner = open_runner(backend, model, model_dir)
    try:
        if not hasattr(runner, "pid"):
            pytest.skip(f"the {backend} backend runs in this process (no worker to kill)")
        runner.run(model.make_feed(0))
        os.kill(runner.pid, signal.SIGKILL)
        error = run_with_hang_guard(runner, model.make_feed(0))
        assert isinstance(error, RunnerError), error
        assert "SIGKILL" in str(error) and "died" in str(error)
        again = run_with_hang_guard(runner, model.make_feed(0))
        assert isinstance(again, RunnerError) and "SIGKILL" in str(again)
    finally:
        runner.close()
    runner.close()


# -- simulator specifics -------------------------------------------------------------------------

needs_simulator = pytest.mark.skipif(
    "simulator" not in available_backends(), reason=WHY_NOT["simulator"]
)


@needs_simulator
def test_simulator_is_quiet_and_exports_the_blob_it_runs(
    tmp_path: Path, test_models: dict[str, models.TestModel], capfd: pytest.CaptureFixture[str]
) -> None:
    from rkort.backends.simulator import open_simulator

    model = test_models["conv_relu"]
    blob = tmp_path / "cache" / "conv.rknn"
    with open_simulator(spec_of(model, "rk3588"), export_to=blob) as runner:
        feed = model.make_feed(3)
        assert_close("simulator", runner.run(feed)[0], reference(model, feed)[0], "conv_relu")
        assert runner.build_info["toolkit_version"]
    assert blob.read_bytes()[:4] == b"RKNN"
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@needs_simulator
def test_simulator_build_failure_raises_the_compilers_error(tmp_path: Path) -> None:
    from rkort.backends.simulator import open_simulator

    path = models.nonzero(tmp_path)
    spec = BuildSpec(str(path), ("x",), ((4,),), ("float32",), ("y",), ((1, 4),), ("int64",))
    with pytest.raises(BuildFailed, match="NonZero"):
        open_simulator(spec, export_to=tmp_path / "x.rknn")
    assert not (tmp_path / "x.rknn").exists()


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


ORPHAN_SCRIPT = """
import os, sys
from rkort.backends.simulator import open_simulator
from rkort.compiler import BuildSpec
spec = BuildSpec(sys.argv[1], ("x",), ((2, 16),), ("float32",), ("y",), ((2, 8),), ("float32",))
runner = open_simulator(spec)
print(runner.pid, runner._worker.workdir, flush=True)
if sys.argv[2:] == ["stopped"]:
    # A worker that cannot run its own watcher thread (as when the toolkit's native code spins
    # holding the GIL): stopped outright.
    os.kill(runner.pid, 19)
os.kill(os.getpid(), 9)
"""


@needs_simulator
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("worker", ["idle", "stopped"])
def test_worker_goes_away_with_the_users_process(
    test_models: dict[str, models.TestModel], worker: str
) -> None:
    import subprocess
    import sys
    import time

    done = subprocess.run(
        [sys.executable, "-c", ORPHAN_SCRIPT, str(test_models["mlp"].path), worker],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    pid_text, workdir = done.stdout.split()
    deadline = time.monotonic() + 60
    while process_alive(int(pid_text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(int(pid_text)):
        os.kill(int(pid_text), signal.SIGKILL)  # leave no orphan behind a failure
        raise AssertionError("the worker outlived the process that started it")
    while os.path.exists(workdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(workdir)


# -- the machine ---------------------------------------------------------------------------------


def test_available_backends_on_this_machine() -> None:
    names = available_backends()
    assert set(names) <= set(BACKENDS)
    assert "cpu" in names
    assert ("board" in names) <= platform.is_board()
    if platform.toolkit_version() is not None and not os.environ.get("RKORT_BOARD"):
        # The module's rehearsal declares an rk3588 and brings the stand-in along.
        assert "board" in names and platform.board_soc() == "rk3588"


def test_platform_answers_on_this_machine() -> None:
    assert platform.default_target() in platform.SUPPORTED_TARGETS
    soc = platform.board_soc()
    assert platform.is_board() == (soc is not None)
    if not platform.is_board():
        assert platform.default_target() == "rk3588"
    for value in (platform.npu_driver_version(), platform.librknnrt_version()):
        assert value is None or value[0].isdigit()


def test_librknnrt_version_is_read_from_the_librarys_strings(tmp_path: Path) -> None:
    lib = tmp_path / "librknnrt.so"
    lib.write_bytes(
        b"\x7fELF" + b"\0" * 100 + b"librknnrt version: 2.3.2 (429f97ae6b@2025-04-09)\0x"
    )
    assert platform._librknnrt_version_in(lib) == "2.3.2"
    (tmp_path / "other.so").write_bytes(b"\x7fELF nothing here")
    assert platform._librknnrt_version_in(tmp_path / "other.so") is None
    assert platform._librknnrt_version_in(tmp_path / "missing.so") is None


@needs_simulator
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_the_workers_watchdog_holds_none_of_its_pipes(
    test_models: dict[str, models.TestModel],
) -> None:
    """The watchdog keeps no end of the worker's pipes open: the app reads the worker's output to
    its end when the worker closes, and must not wait for the watchdog to notice."""
    import time

    from rkort.backends.simulator import open_simulator
    from rkort.compiler import BuildSpec

    spec = BuildSpec(
        str(test_models["mlp"].path),
        ("x",),
        ((2, 16),),
        ("float32",),
        ("y",),
        ((2, 8),),
        ("float32",),
    )
    runner = open_simulator(spec)
    try:
        with open(f"/proc/{runner.pid}/task/{runner.pid}/children") as f:
            (watchdog,) = [int(p) for p in f.read().split()]
        held = {
            os.readlink(f"/proc/{watchdog}/fd/{fd}") for fd in os.listdir(f"/proc/{watchdog}/fd")
        }
        assert held <= {os.devnull, "anon_inode:[pidfd]"}, held
    finally:
        runner.close()
    deadline = time.monotonic() + 10
    while process_alive(watchdog) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(watchdog), "the watchdog outlived its worker"
