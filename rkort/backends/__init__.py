"""Runners for compiled models, one small module per device, found by name and used only through
:class:`~rkort.backends.base.Runner`.

Each module (``board``, ``simulator``, ``adb``, ``cpu``) defines ``BACKEND``, an object with a
``name``, ``builds`` (True: it opens a model from its BuildSpec by building it itself, as the host
simulator must; False: it loads a compiled blob), ``available(options)`` and
``open(Opening(spec, blob=..., ...))``. Adding a device adds a module and
its name in :data:`NAMES`; nothing else changes.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from ..errors import Unsupported
from ..options import RKNNOptions
from .base import Opening, Runner, RunnerClosed, RunnerDied, RunnerError

__all__ = [
    "NAMES",
    "Backend",
    "Opening",
    "Runner",
    "RunnerClosed",
    "RunnerDied",
    "RunnerError",
    "available_backends",
    "choose",
    "get",
]

#: Every backend, in order of preference where several are available.
NAMES = ("adb", "board", "simulator", "cpu")


class Backend(Protocol):
    name: str
    builds: bool

    def available(self, options: RKNNOptions | None = None) -> bool: ...

    def open(self, opening: Opening) -> Runner: ...


def get(name: str) -> Backend:
    """The backend called ``name`` (its module's ``BACKEND``)."""
    if name not in NAMES:
        raise KeyError(f"no backend {name!r}; the backends are {list(NAMES)}")
    module: Any = importlib.import_module(f"{__name__}.{name}")
    return module.BACKEND  # type: ignore[no-any-return]


def choose(options: RKNNOptions) -> Backend:
    """The backend that runs the NPU's work here: the adb board named by ``device_id``, else this
    board's NPU, else the host simulator."""
    for name in ("adb", "board", "simulator"):
        if name == "adb" and not options.device_id:
            continue  # adb serves only a session that names its device (not even imported)
        backend = get(name)
        if backend.available(options):
            return backend
    raise Unsupported(
        "neither rknn-toolkit-lite2 (on a board) nor rknn-toolkit2 (the converter and its "
        "simulator) is installed; install rkort[board] on a board or rkort[compile] on a host"
    )


def available_backends(options: RKNNOptions | None = None) -> list[str]:
    """The backends that can run on this machine now, in order of preference."""
    return [n for n in NAMES if get(n).available(options)]
