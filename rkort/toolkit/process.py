"""The parent's handle on one toolkit child process: start it, follow its build, call it, end it.

The child is started as ``python -m rkort.toolkit.child {compile|serve} FD`` in a temporary
working directory (named after this process, so a directory whose owner died before its child
could start is swept by the next worker), with a socket on FD carrying pickled messages
(``multiprocessing.connection``, see :mod:`.protocol`) both ways and its stdout and stderr piped
to this process, which logs them line by line to ``rkort.toolkit``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..files import owned_tempdir
from ..spec import (
    BuildFailed,
    CompileError,
    CompileTimeout,
    ConverterCrashed,
    ToolkitNotInstalled,
)
from .console import Progress, Tail, forward_output, toolkit_errors
from .protocol import CHILD_MODULE, PARENT_ENV, WORKDIR_PREFIX


class WorkerDied(RuntimeError):
    """The worker process is gone (killed, crashed, or closed its end)."""


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
        python: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``python``: the interpreter that runs the toolkit (this one by default); ``env``: the
        environment the child starts from (this process's by default)."""
        self.subject = subject
        self.workdir = owned_tempdir(WORKDIR_PREFIX)
        self._tail = Tail()
        verb = "compiling" if mode == "compile" else "preparing"
        self._progress = Progress(progress, f"rkort: {verb} {subject}", _stage_count(mode, request))
        self.stage = "starting the toolkit"
        parent_sock, child_sock = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [python or sys.executable, "-m", CHILD_MODULE, mode, str(child_sock.fileno())],
                cwd=self.workdir,
                env=_child_env(self.workdir, os.environ if env is None else env),
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
            target=forward_output,
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
        errors = toolkit_errors(self._tail.lines())
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
        errors = toolkit_errors(self._tail.lines())
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

    def call(self, arrays: Sequence[Any], data_format: Any = None) -> list[Any]:
        """One inference on a serving worker (``data_format`` as the toolkit's ``inference()``
        takes it; by default 4-D inputs are NCHW). Raises WorkerDied, or RuntimeError with its
        reason."""
        try:
            self.conn.send(("run", list(arrays), data_format))
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
        tail = toolkit_errors(self._tail.lines())
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


def _child_env(workdir: Path, base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"
    # The toolkit leaves a temporary directory behind on every build (check.onnx and check.rknn,
    # as large as the blob): inside the workdir it goes when the workdir goes.
    scratch = workdir / "tmp"
    scratch.mkdir(mode=0o700, exist_ok=True)
    env["TMPDIR"] = str(scratch)
    env[PARENT_ENV] = str(os.getpid())
    # The child must import this very rkort whatever its working directory (a source checkout on
    # sys.path only through the parent's cwd, say). An installed rkort needs nothing, and putting
    # site-packages on PYTHONPATH would rank it above the standard library.
    root = str(Path(__file__).resolve().parents[2])
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
