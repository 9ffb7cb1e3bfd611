"""What this machine is: a Rockchip board (which SoC, which NPU driver and runtime) or a host, and
which RKNN packages this Python can use.

The SoC comes from ``RKORT_BOARD`` when set (containers hide the device tree), else from the
device tree (``/proc/device-tree/compatible``, then ``/sys/firmware``). The board runtime's
version comes from ``librknnrt.so`` itself: ``RKORT_LIBRKNNRT`` names the file when it is not in
a standard place. Everything here reads files, the environment or package metadata; nothing
imports the toolkit or starts a process.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import mmap
import os
import re
import sys
from pathlib import Path
from typing import Any

#: The target platforms rknn-toolkit2 2.5.0 accepts in ``config(target_platform=...)``.
SUPPORTED_TARGETS: tuple[str, ...] = (
    "rk3588",
    "rk3576",
    "rk3568",
    "rk3566",
    "rk3562",
    "rv1103",
    "rv1103b",
    "rv1106",
    "rv1106b",
    "rv1126b",
    "rk2118",
)

_COMPATIBLE_FILES = (
    Path("/proc/device-tree/compatible"),
    Path("/sys/firmware/devicetree/base/compatible"),
)
# Device-tree SoC names whose NPU is the one of another target (RK3588S and RK3582 are RK3588 dies).
_SOC_ALIASES = {"rk3588s": "rk3588", "rk3582": "rk3588", "rk3576s": "rk3576"}
_NPU_VERSION_FILES = (
    Path("/sys/kernel/debug/rknpu/version"),
    Path("/proc/debug/rknpu/version"),
    Path("/sys/module/rknpu/version"),
)
#: Declares the SoC where detection cannot see it (a container), e.g. ``RKORT_BOARD=rk3588``.
BOARD_ENV = "RKORT_BOARD"
#: The board runtime's library, where it is not in a standard place.
LIBRKNNRT_ENV = "RKORT_LIBRKNNRT"
#: NPU cores per SoC (the others have one).
_CORES = {"rk3588": 3, "rk3576": 2}
_LIBRKNNRT_FILES = (
    Path("/usr/lib/librknnrt.so"),
    Path("/usr/lib64/librknnrt.so"),
    Path("/usr/local/lib/librknnrt.so"),
    Path("/usr/lib/aarch64-linux-gnu/librknnrt.so"),
)


def _compatible_strings() -> list[str]:
    for path in _COMPATIBLE_FILES:
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        return [s.decode("ascii", "replace").strip().lower() for s in raw.split(b"\0") if s.strip()]
    return []


@functools.lru_cache(maxsize=1)
def _rockchip_socs() -> tuple[str, ...]:
    return tuple(
        s.split(",", 1)[1]
        for s in _compatible_strings()
        if s.startswith("rockchip,") and re.fullmatch(r"r[kv]\d{4}[a-z]?", s.split(",", 1)[1])
    )


def _declared_soc() -> str | None:
    value = os.environ.get(BOARD_ENV, "").strip().lower()
    if not value:
        return None
    value = value.split(",", 1)[-1]  # "rockchip,rk3588" as the device tree writes it
    if not re.fullmatch(r"r[kv]\d{4}[a-z]?", value):
        raise ValueError(
            f"{BOARD_ENV}={os.environ[BOARD_ENV]!r} is not a Rockchip SoC name (e.g. rk3588)"
        )
    return value


def is_board() -> bool:
    """True on a Rockchip board: ``RKORT_BOARD`` declares one, or the device tree names one."""
    return _declared_soc() is not None or bool(_rockchip_socs())


def board_soc() -> str | None:
    """The Rockchip SoC this machine runs on (``"rk3588"``, ``"rk3566"``, ...), or None on a host.

    Variants with the same NPU are reported as their target name (RK3588S -> ``"rk3588"``).
    """
    declared = _declared_soc()
    socs = (declared,) if declared is not None else _rockchip_socs()
    if not socs:
        return None
    for soc in socs:
        name = _SOC_ALIASES.get(soc, soc)
        if name in SUPPORTED_TARGETS:
            return name
    return socs[0]


def default_target() -> str:
    """The target to compile for when the user names none: this board's SoC, else ``"rk3588"``."""
    soc = board_soc()
    return soc if soc in SUPPORTED_TARGETS else "rk3588"


def npu_driver_version() -> str | None:
    """The rknpu kernel driver's version (``"0.9.8"``), where the kernel exposes it."""
    for path in _NPU_VERSION_FILES:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        match = re.search(r"v?(\d+\.\d+(?:\.\d+)*)", text)
        if match:
            return match.group(1)
    return None


def cores_of(soc: str) -> int:
    """How many NPU cores a SoC has (RK3588: 3, RK3576: 2, the others 1)."""
    return _CORES.get(soc, 1)


def librknnrt_version() -> str | None:
    """The board runtime's version (``"2.3.2"``) read from ``librknnrt.so``'s own strings."""
    declared = os.environ.get(LIBRKNNRT_ENV)
    for path in [Path(declared)] if declared else _LIBRKNNRT_FILES:
        version = _librknnrt_version_in(path)
        if version:
            return version
    return None


def _librknnrt_version_in(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            stamp = (str(path), st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if stamp in _RUNTIME_VERSIONS:
                return _RUNTIME_VERSIONS[stamp]  # this very file, read before by this process
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                at = data.find(b"librknnrt version: ")
                text = data[at : at + 120].split(b"\0", 1)[0].decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    match = re.match(r"librknnrt version: v?(\S+)", text) if at >= 0 else None
    version = match.group(1) if match else None
    _RUNTIME_VERSIONS[stamp] = version
    return version


#: librknnrt versions read (each open of a board session checks the runtime), by file stamp.
_RUNTIME_VERSIONS: dict[tuple[Any, ...], str | None] = {}


@functools.cache
def _installed_version(distribution: str, package: str) -> str | None:
    """A distribution's installed version, read once per process: from the ``.dist-info``
    directory next to its ``package`` (one directory listing), else through importlib.metadata
    (which scans every path entry: milliseconds on a session's first open)."""
    spec = importlib.util.find_spec(package)
    places = list(spec.submodule_search_locations or ()) if spec is not None else []
    prefix = distribution.replace("-", "_").lower() + "-"
    for place in places[:1]:
        try:
            with os.scandir(Path(place).parent) as entries:
                for entry in entries:
                    name = entry.name.lower()
                    if name.startswith(prefix) and name.endswith(".dist-info"):
                        return entry.name[len(prefix) : -len(".dist-info")]
        except OSError:
            break
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def toolkit_lite_version() -> str | None:
    """The installed rknn-toolkit-lite2 (the board runtime's Python API) version, if any."""
    return _installed_version("rknn-toolkit-lite2", "rknnlite")


def toolkit_version() -> str | None:
    """The rknn-toolkit2 (the converter and its simulator) this Python can import, or None.

    A distribution whose package cannot be imported here (removed, or kept out of this process)
    counts as absent: what matters is whether a compile can run.
    """
    if not _importable("rknn"):
        return None
    return _installed_version("rknn-toolkit2", "rknn")


def board_runtime_importable() -> bool:
    """True when rknn-toolkit-lite2's ``rknnlite`` package can be imported here."""
    return _importable("rknnlite")


_FOUND: dict[tuple[Any, ...], bool] = {}


def _importable(package: str) -> bool:
    """``importlib.util.find_spec(package) is not None``, remembered for as long as the import
    system looks the same (``sys.path``, ``sys.meta_path``): looking for a package that is not
    imported scans every path entry, twice per session open."""
    if package in sys.modules:
        return sys.modules[package] is not None
    key = (package, tuple(sys.path), tuple(map(id, sys.meta_path)))
    found = _FOUND.get(key)
    if found is None:
        found = importlib.util.find_spec(package) is not None
        if len(_FOUND) > 64:
            _FOUND.clear()
        _FOUND[key] = found
    return found
