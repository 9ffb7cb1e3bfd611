"""``rkort run -- python app.py ...``: an unchanged onnxruntime program, on the NPU.

The command runs in place of ``rkort`` (``exec``) with two things added to its environment:
``PYTHONPATH`` starts with a directory whose ``sitecustomize`` calls ``rkort.install()`` as soon
as the program imports onnxruntime, and ``RKORT_AUTO=1`` moves the sessions it creates with default
or CPU providers to RKNN first, with the CPU behind (see :mod:`rkort.integrations.defaults`).
Child Python processes inherit both. ``rkort run --env`` prints the same variables, for a service
whose command line cannot change (systemd ``Environment=``, docker ``--env-file``).

``rkort run --board SOC`` adds what rehearses a board (:func:`rehearsal_environment`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..platform import BOARD_ENV, LIBRKNNRT_ENV
from ..rehearsal import PYTHON_ENV, REHEARSAL_ENV
from ..rehearsal import SITE_DIR as STAND_IN_DIR
from ..stats import REPORT_ENV
from .defaults import ENV_AUTO, ENV_EXCLUDE, ENV_OPTIONS

#: The directory put first on PYTHONPATH; its sitecustomize.py installs rkort.
SITE_DIR = Path(__file__).resolve().with_name("_site")


def run_environment(
    base: Mapping[str, str],
    *,
    auto: bool = True,
    options: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, str]:
    """``base`` with rkort's launcher first on PYTHONPATH and the RKORT_AUTO policy set."""
    env = dict(base)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(SITE_DIR)]
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *rest])
    env[ENV_AUTO] = "1" if auto else "0"
    if options:
        env[ENV_OPTIONS] = ";".join(f"{k}={v}" for k, v in options.items())
    if exclude:
        env[ENV_EXCLUDE] = os.pathsep.join(exclude)
    return env


def rehearsal_environment(
    base: Mapping[str, str], soc: str, report_dir: Path, librknnrt: Path, python: str
) -> dict[str, str]:
    """``base`` (a :func:`run_environment`) made a board rehearsal: the SoC declared, the
    ``rknnlite`` stand-in on PYTHONPATH, the converter kept out of reach (the launcher's
    sitecustomize sees ``RKORT_REHEARSAL``), a librknnrt of the given version, where each process
    writes its report, and the Python whose toolkit runs the simulator."""
    env = dict(base)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(SITE_DIR)]
    rest = [p for p in rest if p != str(STAND_IN_DIR)]
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), str(STAND_IN_DIR), *rest])
    env[BOARD_ENV] = soc
    env[REHEARSAL_ENV] = "1"
    env[REPORT_ENV] = str(report_dir)
    env[LIBRKNNRT_ENV] = str(librknnrt)
    env[PYTHON_ENV] = python
    return env
