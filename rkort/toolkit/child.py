"""The toolkit child process: ``python -m rkort.toolkit.child {compile|serve} FD``.

It reads one request (see :mod:`.protocol`), runs rknn-toolkit2 in its own working directory,
reports each stage, and then either exits with the exported blob (compile) or serves inference
calls (serve) until the parent closes the socket or dies.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..files import pid_alive
from ..spec import data_formats
from .hybrid import analyse, layered_build
from .protocol import DATASET_NAME, PARENT_ENV, WORKDIR_PREFIX


class _Failure(Exception):
    def __init__(self, kind: str, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.stage, self.reason = kind, stage, reason


def _reason(exc: BaseException) -> str:
    """The toolkit's own message, without the traceback it packs into its ValueErrors."""
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        heads = list(re.finditer(r"^\w+(?:Error|Exception): ", text, re.M))
        if heads:
            text = text[heads[-1].end() :]
    text = " ".join(text.split())
    return text or type(exc).__name__


class _Child:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.stage = "starting the toolkit"

    def enter(self, stage: str) -> None:
        self.stage = stage
        self.conn.send(("stage", stage))

    def check(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a toolkit function; a ValueError, a -1 return or an exit() is a build failure."""
        try:
            ret = fn(*args, **kwargs)
        except SystemExit as e:
            raise _Failure("BuildFailed", self.stage, f"{what} called exit({e.code})") from e
        except Exception as e:  # noqa: BLE001 - any toolkit exception is its refusal
            raise _Failure("BuildFailed", self.stage, _reason(e)) from e
        if isinstance(ret, int) and ret != 0:
            raise _Failure("BuildFailed", self.stage, f"{what} returned {ret}")
        return ret


def _child_main(mode: str, fd: int) -> int:
    conn = Connection(fd)
    _exit_with_parent()
    try:
        return _work(conn, mode)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        # The parent is gone (killed, say): nobody will read what we made, or remove it.
        _remove_own_workdir()
        return 0


def _work(conn: Connection, mode: str) -> int:
    request = conn.recv()
    child = _Child(conn)
    try:
        import importlib.metadata

        try:
            from rknn.api import RKNN
        except ImportError as e:
            reason = str(e)
            if "pkg_resources" in reason:
                reason += " (rknn-toolkit2 2.5.0 needs setuptools<81)"
            raise _Failure("ToolkitNotInstalled", child.stage, reason) from e
        try:
            version = importlib.metadata.version("rknn-toolkit2")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        rknn = child.check("RKNN()", RKNN, verbose=False)
        runtime = request.get("runtime")
        if runtime and runtime.get("blob"):
            info = _load_blob(child, rknn, runtime["blob"])
        else:
            info, rknn = _build(child, rknn, request)
        info["toolkit_version"] = version
        if mode == "compile":
            conn.send(("done", info))
            return 0
        started = time.monotonic()
        if runtime and runtime.get("blob"):
            child.enter("connecting to the board")
            child.check(
                "init_runtime()",
                rknn.init_runtime,
                target=runtime["target"],
                device_id=runtime.get("device_id"),
            )
        else:
            child.enter("starting the simulator")
            child.check("init_runtime()", rknn.init_runtime)
        info["runtime_seconds"] = time.monotonic() - started
        conn.send(("ready", info))
    except _Failure as f:
        conn.send(("error", f.kind, f.stage, f.reason))
        return 1
    _serve(conn, rknn, request["input_shapes"])
    return 0


def _build(child: _Child, rknn: Any, request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Build what the request asks (float, quantized, or a hybrid of both) and export it;
    returns what to report and the RKNN object holding the build."""
    started = time.monotonic()
    child.enter("configuring")
    config: dict[str, Any] = {
        "target_platform": request["target"],
        "float_dtype": request["float_dtype"],
        "optimization_level": request["optimization_level"],
    }
    quantized = request["quantized_dtype"]
    if quantized:
        config["quantized_dtype"] = quantized
        config["quantized_algorithm"] = request.get("quantized_algorithm") or "normal"
        config["quantized_method"] = request.get("quantized_method") or "channel"
    if request.get("dynamic_input"):
        config["dynamic_input"] = request["dynamic_input"]
    child.check("config()", rknn.config, **config)
    child.enter("loading")
    child.check(
        "load_onnx()",
        rknn.load_onnx,
        request["model_path"],
        inputs=request["input_names"],
        input_size_list=request["input_shapes"],
        outputs=request["output_names"],
    )
    child.enter("building")
    dataset = None
    samples = request.get("dataset") or []
    if quantized:
        dataset = os.path.abspath(DATASET_NAME)
        with open(dataset, "w") as f:
            f.writelines(" ".join(sample) + "\n" for sample in samples)
    info: dict[str, Any] = {"blob": None}
    selection = request.get("layer_selection")
    if quantized and selection:

        def fresh() -> Any:
            from rknn.api import RKNN

            made = child.check("RKNN()", RKNN, verbose=False)
            child.check("config()", made.config, **config)
            return made

        rknn, info["float_layers"] = layered_build(
            child.check,
            fresh,
            rknn,
            dataset or "",
            samples,
            request.get("float_layers") or [],
            selection[0],
            int(selection[1]),
            request.get("min_cosine"),
            float(selection[2]),
            request["output_names"],
        )
    else:
        child.check(
            "build()",
            rknn.build,
            do_quantization=bool(quantized),
            dataset=dataset,
            auto_hybrid=bool(quantized) and request.get("hybrid") == "auto",
        )
    if request.get("analyse"):
        child.enter("analysing")
        info["layers"] = analyse(child.check, rknn, request["analyse"], Path("analysis").resolve())
    if request["export"]:
        child.enter("exporting")
        child.check("export_rknn()", rknn.export_rknn, os.path.abspath(request["export"]))
        info["blob"] = request["export"]
    info["build_seconds"] = time.monotonic() - started
    return info, rknn


def _load_blob(child: _Child, rknn: Any, blob: str) -> dict[str, Any]:
    child.enter("loading the blob")
    child.check("load_rknn()", rknn.load_rknn, blob)
    return {"blob": None, "build_seconds": 0.0}


def _serve(conn: Connection, rknn: Any, input_shapes: list[list[int]]) -> None:
    formats = data_formats(input_shapes)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            _remove_own_workdir()  # the parent is gone without closing us
            return
        if message[0] != "run":
            return
        given = message[2] if len(message) > 2 else None
        try:
            outputs = rknn.inference(inputs=message[1], data_format=given or formats)
        except Exception as e:  # noqa: BLE001 - reported to the parent, the worker lives on
            conn.send(("failed", f"rknn-toolkit2 inference() failed: {_reason(e)}"))
            continue
        if outputs is None:
            conn.send(
                ("failed", "rknn-toolkit2 inference() returned None (see the rkort.toolkit log)")
            )
            continue
        conn.send(("ok", list(outputs)))


def _exit_with_parent() -> None:
    """End this worker when the process that started it is gone (it runs in its own session).

    A watchdog process (forked here, before the toolkit is loaded) does it: a thread of this
    worker could not, while the toolkit's native code holds the GIL (the simulator spins for
    ever on some float16 overflows, and such a worker outlived a SIGKILLed app). The thread
    stays as a second line, for a system where the fork fails."""
    try:
        parent = int(os.environ[PARENT_ENV])
    except (KeyError, ValueError):
        parent = os.getppid()
    if os.getppid() != parent:  # gone before we started watching
        _remove_own_workdir()
        os._exit(0)
    try:
        if os.fork() == 0:
            _watchdog(parent, os.getppid())
    except OSError:
        pass

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                _remove_own_workdir()
                os._exit(0)

    threading.Thread(target=watch, name="rkort-parent-watch", daemon=True).start()


def _watchdog(app: int, worker: int) -> None:
    """In the forked watchdog: SIGKILL ``worker`` (and remove its workdir) once ``app`` is gone;
    leave when the worker is. Never returns."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # The worker's pipes (its requests, and its output the app reads to the end) must end
        # with the worker, not with us.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 1 << 16)
        try:
            handle: int | None = os.pidfd_open(app)
        except (AttributeError, OSError):
            handle = None  # no pidfd here: poll the pid
        while os.getppid() == worker:
            if handle is not None:
                gone = bool(select.select([handle], [], [], 0.5)[0])
            else:
                time.sleep(0.5)
                gone = not pid_alive(app)
            if gone:
                os.kill(worker, signal.SIGKILL)
                _remove_own_workdir()
                break
    except BaseException:  # noqa: BLE001 - a watchdog never raises into the worker's code
        code = 1
    os._exit(code)


def _remove_own_workdir() -> None:
    """Remove this worker's temporary cwd when no parent is left to do it."""
    cwd = os.getcwd()
    if os.path.basename(cwd).startswith(WORKDIR_PREFIX):
        shutil.rmtree(cwd, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("compile", "serve"):
        print(
            f"usage: python -m {__spec__.name if __spec__ else __name__} {{compile|serve}} FD",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = 1
    try:
        code = _child_main(argv[0], int(argv[1]))
    except BaseException:  # noqa: BLE001 - printed for the parent's log; the exit code says it
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:
            pass
        # Skip interpreter teardown: the toolkit's native threads and atexit hooks can hang or
        # crash.
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
