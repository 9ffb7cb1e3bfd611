"""``rkort run -- python app.py ...``: an unchanged onnxruntime program, on the NPU.

The command runs in place of ``rkort`` (``exec``) with two things added to its environment:
``PYTHONPATH`` starts with a directory whose ``sitecustomize`` calls ``rkort.install()`` as soon
as the program imports onnxruntime, and ``RKORT_AUTO=1`` moves the sessions it creates with default
or CPU providers to RKNN first, with the CPU behind (see :mod:`rkort.integrations.defaults`).
Child Python processes inherit both. ``rkort run --env`` prints the same variables, for a service
whose command line cannot change (systemd ``Environment=``, docker ``--env-file``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

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
