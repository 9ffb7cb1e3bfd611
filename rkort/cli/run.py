"""``rkort run -- COMMAND``: an unchanged onnxruntime program, with its sessions on RKNN
(see :mod:`rkort.integrations.run` for the environment it is given)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..integrations.defaults import ENV_AUTO, ENV_EXCLUDE, ENV_OPTIONS
from ..integrations.run import rehearsal_environment, run_environment
from ..options import RKNNOptions
from ..platform import SUPPORTED_TARGETS
from ..rehearsal.report import format_report, gather
from .common import UsageError


def _options(items: Sequence[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or ";" in item:
            raise UsageError(f"expected --option KEY=VALUE (no ';'), got {item!r}")
        options[key] = value
    try:
        RKNNOptions.parse(options)
    except Exception as e:  # noqa: BLE001 - onnxruntime's InvalidArgument, shown without a traceback
        raise UsageError(str(e).rpartition(" : ")[2]) from None
    return options


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command and not args.env:
        raise UsageError("give the command to run, e.g. rkort run -- python app.py")
    env = run_environment(
        os.environ,
        auto=not args.no_auto,
        options=_options(args.option or []),
        exclude=args.exclude or [],
    )
    if args.env:
        for key in ("PYTHONPATH", ENV_AUTO, ENV_OPTIONS, ENV_EXCLUDE):
            if key in env:
                print(f"{key}={env[key]}")
        return 0
    if args.board:
        return _rehearse(args.board, args.librknnrt, command, env)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        return _cannot_start(command, e)
    return 0  # not reached: exec replaced this process


def _cannot_start(command: list[str], error: OSError) -> int:
    """The shell's exit codes for a command that cannot be started (127: not found; 126)."""
    missing = isinstance(error, FileNotFoundError)
    print(
        f"rkort run: {'command not found' if missing else 'permission denied'}: {command[0]}",
        file=sys.stderr,
    )
    return 127 if missing else 126


def _rehearse(soc: str, librknnrt: str, command: list[str], env: dict[str, str]) -> int:
    """Run ``command`` as on a ``soc`` board, then print what ran where."""
    soc = soc.strip().lower()
    if soc not in SUPPORTED_TARGETS:
        raise UsageError(
            f"--board {soc}: not a target rknn-toolkit2 builds for {list(SUPPORTED_TARGETS)}"
        )
    if not re.fullmatch(r"\d+\.\d+\.\d+", librknnrt):
        raise UsageError(f"--librknnrt {librknnrt}: expected a version such as 2.3.2")
    with tempfile.TemporaryDirectory(prefix="rkort-rehearsal-") as tmp:
        reports = Path(tmp) / "reports"
        reports.mkdir()
        # A librknnrt the board runtime's version is read from, as on a board.
        lib = Path(tmp) / "librknnrt.so"
        lib.write_bytes(f"\0librknnrt version: {librknnrt} (rkort rehearsal)\0".encode())
        env = rehearsal_environment(env, soc, reports, lib, sys.executable)
        try:
            proc = subprocess.Popen(command, env=env)
        except OSError as e:
            return _cannot_start(command, e)
        forward = {sig: signal.signal(sig, lambda n, _f: proc.send_signal(n)) for sig in _FORWARDED}
        try:
            code = proc.wait()
        finally:
            for sig, handler in forward.items():
                signal.signal(sig, handler)
        print(format_report(soc, gather(reports)), file=sys.stderr)
    return code


_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``run`` subcommand, for :func:`rkort.cli.build_parser`."""
    r = sub.add_parser(
        "run",
        help="run an unchanged onnxruntime program with its sessions on RKNN (CPU fallback)",
        description=(
            "Runs COMMAND with rkort installed into every Python process it starts: sessions "
            "created with default or CPU-only providers run RKNNExecutionProvider first, with "
            "the CPU as fallback. Export validation, quantization and other tools keep the CPU."
        ),
        epilog="example: rkort run -- python app.py --input photo.jpg",
    )
    r.add_argument(
        "--no-auto",
        action="store_true",
        help="only install rkort (provider='RKNN' works); sessions keep the providers they ask for",
    )
    r.add_argument(
        "-o",
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="an RKNNExecutionProvider option for the sessions moved to RKNN, e.g. target=rk3576 (repeatable)",
    )
    r.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="keep models whose file name (or, with a '/', path) matches this glob on their own providers (repeatable)",
    )
    r.add_argument(
        "--board",
        metavar="SOC",
        help="rehearse an SOC board (rk3588, rk3576, ...) on this host: the board code path, blobs "
        "from the cache only, no converter; prints what ran on the NPU and what the cache lacks",
    )
    r.add_argument(
        "--librknnrt",
        default="2.5.0",
        metavar="VERSION",
        help="with --board: the version of the rehearsed board's librknnrt (default 2.5.0)",
    )
    r.add_argument(
        "--env",
        action="store_true",
        help="print the environment variables instead of running anything (for services)",
    )
    r.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND [ARG ...]",
        help="the command to run and its arguments",
    )
    r.set_defaults(func=cmd_run)
