"""The process that runs rknn-toolkit2, and the parent's handle on it.

The child is started as ``python -m rkort._worker {compile|serve} FD`` in a temporary working
directory, with a socket on FD carrying pickled messages (``multiprocessing.connection``) both ways
and its stdout and stderr piped to the parent, which logs them line by line to ``rkort.toolkit``.

Protocol (parent -> child first): a request dict from :func:`build_request`; the child answers
``("stage", name)`` as it goes, then ``("done", info)`` (compile) or ``("ready", info)`` (serve), or
``("error", kind, stage, reason)``. A serving child then answers each ``("run", arrays)`` with
``("ok", arrays)`` or ``("failed", reason)`` until ``("close",)`` or the socket closes.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

from .compiler import (
    BuildFailed,
    BuildSpec,
    CompileError,
    CompileTimeout,
    ConverterCrashed,
    ToolkitNotInstalled,
    dataset_samples,
)

toolkit_log = logging.getLogger("rkort.toolkit")

_BLOB_NAME = "model.rknn"
_WORKDIR_PREFIX = "rkort-toolkit-"
_DATASET_NAME = "dataset.txt"
_ANSI = re.compile(rb"\x1b\[[0-9;]*m")
# The toolkit's tqdm bars end with '\r' and its next message often follows without a newline.
_LINE_BREAK = re.compile(rb"\r\n|\r|\n|(?=\x1b\[1;3\dm[EWID]\x1b\[0m )")
_PROGRESS_LINE = re.compile(r"\d+%\|.*\|")
_KEEP_LINES = 400
# The pid of the process that started the worker: the child cannot learn it from getppid() alone,
# since the parent may already be gone (and the child re-parented) by the time it looks.
_PARENT_ENV = "RKORT_WORKER_PARENT"


class WorkerDied(RuntimeError):
    """The worker process is gone (killed, crashed, or closed its end)."""


# ---------------------------------------------------------------------------------------------
# Parent side


def build_request(
    spec: BuildSpec, *, export: bool, runtime: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The first message to a worker: what to build (paths made absolute) and what to do after.

    ``runtime`` None: build (and export) only. ``{"target": None}``: build, then start the
    simulator. ``{"blob": path, "target": t, "device_id": d}``: load a blob and run it on a board.
    """
    return {
        "model_path": os.path.abspath(spec.model_path),
        "input_names": list(spec.input_names),
        "input_shapes": [list(s) for s in spec.input_shapes],
        "output_names": list(spec.output_names),
        "output_shapes": [list(s) for s in spec.output_shapes],
        "target": spec.target,
        "float_dtype": spec.float_dtype,
        "quantized_dtype": spec.quantized_dtype,
        "dataset": dataset_samples(spec.dataset) if spec.quantized_dtype and spec.dataset else None,
        "optimization_level": spec.optimization_level,
        "dynamic_input": [[list(shape) for shape in group] for group in spec.dynamic_input],
        "export": _BLOB_NAME if export else None,
        "runtime": runtime,
    }


class WorkerProcess:
    """One toolkit child process with its own temporary working directory.

    ``wait_until("done"|"ready")`` follows the build and raises :class:`CompileError` subclasses;
    ``call(arrays)`` runs one inference on a serving worker; ``close()`` ends it and removes the
    directory (also done by a finalizer if the object is dropped).
    """

    def __init__(
        self,
        mode: str,
        request: dict[str, Any],
        *,
        subject: str,
        progress: bool | None = None,
    ) -> None:
        self.subject = subject
        self.workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
        self._tail = _Tail()
        verb = "compiling" if mode == "compile" else "preparing"
        self._progress = _Progress(
            progress, f"rkort: {verb} {subject}", _stage_count(mode, request)
        )
        self.stage = "starting the toolkit"
        parent_sock, child_sock = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rkort._worker", mode, str(child_sock.fileno())],
                cwd=self.workdir,
                env=_child_env(self.workdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(child_sock.fileno(),),
                # Own session: a Ctrl+C meant for the user's program must not kill the worker.
                start_new_session=True,
            )
        except OSError as e:
            parent_sock.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._progress.close()
            raise CompileError(
                f"could not start the toolkit process ({sys.executable}): {e}"
            ) from e
        finally:
            child_sock.close()
        self.pid = self.proc.pid
        self.conn = Connection(parent_sock.detach())
        assert self.proc.stdout is not None
        self._reader = threading.Thread(
            target=_forward_output,
            args=(self.proc.stdout, self._tail, f"{subject} [pid {self.pid}]"),
            name=f"rkort-toolkit-log-{self.pid}",
            daemon=True,
        )
        self._reader.start()
        self._finalizer = weakref.finalize(
            self, _shut_down, self.proc, self.conn, self.workdir, self._reader, os.getpid()
        )
        try:
            self.conn.send(request)
        except OSError:
            pass  # the child died at once; wait_until reports how

    # -- building --

    def wait_until(self, expected: str, timeout: float | None = None) -> dict[str, Any]:
        """Follow the child's stages until it sends ``expected``; raise if it fails or dies."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if self.conn.poll(0.25):
                    try:
                        message = self.conn.recv()
                    except (EOFError, OSError):
                        raise self._crashed() from None
                    kind = message[0]
                    if kind == "stage":
                        self.stage = message[1]
                        self._progress.advance(message[1])
                    elif kind == expected:
                        return dict(message[1])
                    elif kind == "error":
                        raise self._failed(message[1], message[2], message[3])
                    else:
                        raise self._crashed(f"sent an unexpected message {kind!r}")
                elif self.proc.poll() is not None and not self.conn.poll(0):
                    raise self._crashed()
                elif deadline is not None and time.monotonic() > deadline:
                    self._stop(kill=True)
                    raise CompileTimeout(
                        f"rknn-toolkit2 on {self.subject} did not finish within {timeout:g} s "
                        f"(it was {self.stage}); the conversion process was stopped",
                        stage=self.stage,
                    )
                else:
                    self._progress.refresh()
        finally:
            self._progress.close()

    def _failed(self, kind: str, stage: str, reason: str) -> CompileError:
        self._stop(kill=False)
        errors = _toolkit_errors(self._tail.lines())
        if kind == "ToolkitNotInstalled":
            return ToolkitNotInstalled(
                f"rknn-toolkit2 cannot be imported by {sys.executable}: {reason}. Install the "
                "converter with `pip install rkort[compile]` (see the README for the CPU-torch "
                "recipe), or run on a board with a compiled blob in the cache.",
                stage=stage,
            )
        extra = [e for e in errors if e.split(": ", 1)[-1] not in reason]
        text = _sentence(f"rknn-toolkit2 failed on {self.subject} while {stage}: {reason}")
        if extra:
            text += f" The toolkit's last errors: {' | '.join(extra)}"
        return BuildFailed(text, stage=stage, toolkit_errors=tuple(errors))

    def _crashed(self, detail: str | None = None) -> ConverterCrashed:
        self._stop(kill=detail is not None)
        errors = _toolkit_errors(self._tail.lines())
        how = detail or _describe_exit(self.proc.returncode)
        text = f"The rknn-toolkit2 process for {self.subject} {how} while {self.stage}."
        if errors:
            text += f" The toolkit's last errors: {' | '.join(errors)}"
        else:
            tail = self._tail.lines()[-3:]
            if tail:
                text += f" Its last output: {' | '.join(tail)}"
        return ConverterCrashed(text, stage=self.stage, toolkit_errors=tuple(errors))

    # -- serving --

    def call(self, arrays: Sequence[Any]) -> list[Any]:
        """One inference on a serving worker. Raises WorkerDied, or RuntimeError with its reason."""
        try:
            self.conn.send(("run", list(arrays)))
            while not self.conn.poll(0.5):
                if self.proc.poll() is not None and not self.conn.poll(0):
                    raise EOFError
            message = self.conn.recv()
        except (EOFError, OSError):
            self._stop(kill=False)  # it closed the socket: it is exiting, let it say how
            raise WorkerDied(self._death_note()) from None
        if message[0] == "ok":
            return list(message[1])
        raise RuntimeError(message[1])

    def _death_note(self) -> str:
        code = self.proc.returncode
        note = _describe_exit(code) if code is not None else "stopped answering"
        tail = _toolkit_errors(self._tail.lines())
        return note + (f"; the toolkit's last errors: {' | '.join(tail)}" if tail else "")

    # -- ending --

    def _stop(self, *, kill: bool) -> None:
        _stop_process(self.proc, kill=kill)
        self._reader.join(timeout=2)

    def close(self) -> None:
        """End the child (politely, then by force) and remove its working directory."""
        self._progress.close()
        self._finalizer()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stage_count(mode: str, request: dict[str, Any]) -> int:
    runtime = request.get("runtime")
    if runtime and runtime.get("blob"):
        return 2  # loading the blob, connecting to the board
    # configuring, loading, building [, exporting] [, starting the simulator]
    return 3 + bool(request.get("export")) + (mode == "serve")


def _child_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # The toolkit leaves a temporary directory behind on every build (check.onnx and check.rknn,
    # as large as the blob): inside the workdir it goes when the workdir goes.
    scratch = workdir / "tmp"
    scratch.mkdir(mode=0o700, exist_ok=True)
    env["TMPDIR"] = str(scratch)
    env[_PARENT_ENV] = str(os.getpid())
    # The child must import this very rkort whatever its working directory (a source checkout on
    # sys.path only through the parent's cwd, say). An installed rkort needs nothing, and putting
    # site-packages on PYTHONPATH would rank it above the standard library.
    root = str(Path(__file__).resolve().parent.parent)
    if root not in _site_dirs():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _site_dirs() -> set[str]:
    import site

    dirs = set(site.getsitepackages()) if hasattr(site, "getsitepackages") else set()
    dirs.add(site.getusersitepackages())
    return {str(Path(d).resolve()) for d in dirs}


def _stop_process(proc: subprocess.Popen[bytes], *, kill: bool) -> None:
    if proc.poll() is not None:
        return
    if not kill:
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _shut_down(
    proc: subprocess.Popen[bytes],
    conn: Connection,
    workdir: Path,
    reader: threading.Thread,
    owner_pid: int,
) -> None:
    if os.getpid() != owner_pid:  # a fork of the user's process: the worker is not ours
        return
    if proc.poll() is None:
        try:
            conn.send(("close",))
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _stop_process(proc, kill=True)
    conn.close()
    reader.join(timeout=2)
    if proc.stdout is not None:
        proc.stdout.close()
    shutil.rmtree(workdir, ignore_errors=True)


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if name == "SIGKILL":
            return "was killed by SIGKILL (out of memory, or killed by another process)"
        return f"was killed by {name}"
    return f"exited unexpectedly with code {code}"


class _Tail:
    """The child's last output lines (progress bars left out), shared with the reader thread."""

    def __init__(self) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=_KEEP_LINES)
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)


def _forward_output(stream: IO[bytes], keep: _Tail, label: str) -> None:
    """Send the child's console output to the rkort.toolkit logger, one line at a time."""
    pending = b""
    fd = stream.fileno()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if chunk:
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r"))
            if cut < 0:
                continue
            complete, pending = pending[: cut + 1], pending[cut + 1 :]
        else:
            complete, pending = pending, b""
        for raw in _LINE_BREAK.split(complete):
            line = _ANSI.sub(b"", raw).decode("utf-8", "replace").rstrip()
            if not line.strip():
                continue
            toolkit_log.debug("%s: %s", label, line)
            if not _PROGRESS_LINE.search(line):
                keep.append(line)
        if not chunk:
            return


def _toolkit_errors(lines: Sequence[str], limit: int = 5) -> list[str]:
    """The toolkit's error lines (``E ...`` and their continuations), newest last, without noise."""
    lines = list(lines)
    found: list[str] = []
    for i, line in enumerate(lines):
        if not line.startswith("E "):
            continue
        text = re.sub(r"^RKNN: \[[\d:.]+\]\s*", "RKNN: ", line[2:].strip())
        if (
            "Unkown op target" in text
            or text.startswith("rknn-toolkit2 version")
            or "Traceback (most recent call last)" in text
        ):
            continue
        for more in lines[i + 1 :]:
            if not more.startswith(" ") or more.lstrip().startswith("File "):
                break
            text += " " + more.strip()
        text = " ".join(text.split())
        if text not in found:
            found.append(text)
    return found[-limit:]


class _Progress:
    """A one-line tqdm indicator naming the current stage, on stderr (only a terminal by default)."""

    def __init__(self, show: bool | None, desc: str, total: int) -> None:
        if show is None:
            show = sys.stderr is not None and sys.stderr.isatty()
        self._desc = desc
        self._bar = None
        if show:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=f"{desc}: starting the toolkit",
                file=sys.stderr,
                leave=False,
                bar_format="{desc} ({n_fmt}/{total_fmt}, {elapsed})",
            )

    def advance(self, stage: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(f"{self._desc}: {stage}", refresh=False)
            self._bar.update(1)

    def refresh(self) -> None:
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------------------------------
# Child side


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
            info = _build(child, rknn, request)
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


def _build(child: _Child, rknn: Any, request: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    child.enter("configuring")
    config: dict[str, Any] = {
        "target_platform": request["target"],
        "float_dtype": request["float_dtype"],
        "optimization_level": request["optimization_level"],
    }
    if request["quantized_dtype"]:
        config["quantized_dtype"] = request["quantized_dtype"]
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
    if request["quantized_dtype"]:
        dataset = os.path.abspath(_DATASET_NAME)
        with open(dataset, "w") as f:
            f.writelines(" ".join(sample) + "\n" for sample in request["dataset"])
    child.check(
        "build()", rknn.build, do_quantization=bool(request["quantized_dtype"]), dataset=dataset
    )
    info: dict[str, Any] = {"blob": None}
    if request["export"]:
        child.enter("exporting")
        child.check("export_rknn()", rknn.export_rknn, os.path.abspath(request["export"]))
        info["blob"] = request["export"]
    info["build_seconds"] = time.monotonic() - started
    return info


def _load_blob(child: _Child, rknn: Any, blob: str) -> dict[str, Any]:
    child.enter("loading the blob")
    child.check("load_rknn()", rknn.load_rknn, blob)
    return {"blob": None, "build_seconds": 0.0}


def data_formats(shapes: Sequence[Sequence[int]]) -> list[str]:
    """The toolkit's per-input layout: ONNX 4-D inputs are NCHW (it would assume NHWC).

    Given for every input (it only matters for 4-D ones): without it the toolkit prints a warning
    on every call.
    """
    return ["nchw" if len(s) == 4 else "nhwc" for s in shapes]


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
        try:
            outputs = rknn.inference(inputs=message[1], data_format=formats)
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
    """End this worker when the process that started it is gone (it runs in its own session)."""
    try:
        parent = int(os.environ[_PARENT_ENV])
    except (KeyError, ValueError):
        parent = os.getppid()
    if os.getppid() != parent:  # gone before we started watching
        _remove_own_workdir()
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                _remove_own_workdir()
                os._exit(0)

    threading.Thread(target=watch, name="rkort-parent-watch", daemon=True).start()


def _remove_own_workdir() -> None:
    """Remove this worker's temporary cwd when no parent is left to do it."""
    cwd = os.getcwd()
    if os.path.basename(cwd).startswith(_WORKDIR_PREFIX):
        shutil.rmtree(cwd, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("compile", "serve"):
        print("usage: python -m rkort._worker {compile|serve} FD", file=sys.stderr)
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
