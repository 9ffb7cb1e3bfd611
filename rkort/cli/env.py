"""``rkort env``: what this machine is, which RKNN pieces it has, and whether they fit together."""

from __future__ import annotations

import argparse
import json
import platform as _platform
import re
from typing import Any

import onnxruntime

from ..platform import (
    board_soc,
    default_target,
    is_board,
    librknnrt_version,
    npu_driver_version,
    toolkit_lite_version,
    toolkit_version,
)
from ..version import __version__


def environment() -> dict[str, Any]:
    """What this machine is and which RKNN pieces it has."""
    board = is_board()
    tk, lite, rt = toolkit_version(), toolkit_lite_version(), librknnrt_version()
    notes = []
    compatible = True
    if board:
        if rt is None:
            compatible = False
            notes.append(
                "no librknnrt.so found: install the board runtime (librknnrt) from Rockchip's SDK"
            )
        for name, v in (("rknn-toolkit-lite2", lite), ("rknn-toolkit2", tk)):
            if v and rt and _version_tuple(rt) < _version_tuple(v):
                compatible = False
                notes.append(
                    f"librknnrt {rt} is older than {name} {v}: blobs it makes will be refused ('Invalid RKNN model version'); update librknnrt"
                )
        if lite is None and tk is None:
            compatible = False
            notes.append(
                "neither rknn-toolkit-lite2 nor rknn-toolkit2 is installed: pip install 'rkort[board]'"
            )
    else:
        if tk is None:
            compatible = False
            notes.append(
                "rknn-toolkit2 is not installed: nothing can be compiled or simulated here"
            )
        else:
            notes.append(f"host: blobs compiled here need librknnrt >= {tk} on the board")
    return {
        "machine": "board" if board else "host",
        "arch": _platform.machine(),
        "soc": board_soc(),
        "default_target": default_target(),
        "npu_driver": npu_driver_version(),
        "librknnrt": rt,
        "rknn_toolkit2": tk,
        "rknn_toolkit_lite2": lite,
        "onnxruntime": onnxruntime.__version__,
        "rkort": __version__,
        "python": _platform.python_version(),
        "compatible": compatible,
        "notes": notes,
    }


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def cmd_env(args: argparse.Namespace) -> int:
    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    for k, v in env.items():
        if k == "notes":
            continue
        print(
            f"{k:20} {'yes' if v is True else 'no' if v is False else v if v is not None else '-'}"
        )
    for note in env["notes"]:
        print(f"note: {note}")
    return 0
