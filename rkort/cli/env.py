"""``rkort env``: what this machine is, which RKNN pieces it has, and whether they fit together."""

from __future__ import annotations

import argparse
import json
import platform as _platform
import re
from typing import Any

import onnxruntime

from ..blobinfo import BlobFormatError, read_blob_info, runtime_can_load
from ..cache import Cache
from ..platform import (
    board_runtime_importable,
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
        if not board_runtime_importable() and tk is None:
            compatible = False
            notes.append(
                "neither rknn-toolkit-lite2 nor rknn-toolkit2 is installed: pip install 'rkort[board]'"
            )
        refused = [b for b in cached_blobs(board_soc(), rt) if b["loadable"] is False]
        if refused:
            notes.append(
                f"{len(refused)} cached blob(s) cannot be loaded here (built for another SoC, or by "
                f"a toolkit newer than this librknnrt {rt}): see the 'blob' lines"
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
        "blobs": cached_blobs(board_soc() if board else None, rt) if board else [],
    }


def cached_blobs(soc: str | None, runtime: str | None) -> list[dict[str, Any]]:
    """The blobs in the cache, each with the toolkit that built it (from the blob itself) and
    whether this board's runtime loads it (None where a version is unknown)."""
    rows = []
    for entry in Cache().entries():
        try:
            info = read_blob_info(entry.blob_path)
            built, targets = info.version, list(info.targets)
        except (OSError, BlobFormatError):
            built, targets = None, []
        loadable = runtime_can_load(built or "", runtime)
        if soc is not None and targets and soc not in targets:
            loadable = False
        rows.append(
            {
                "key": entry.key,
                "model": entry.meta.get("model"),
                "inputs": entry.meta.get("inputs"),
                "targets": targets,
                "toolkit": built,
                "loadable": loadable,
            }
        )
    return rows


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def cmd_env(args: argparse.Namespace) -> int:
    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    for k, v in env.items():
        if k in ("notes", "blobs"):
            continue
        print(
            f"{k:20} {'yes' if v is True else 'no' if v is False else v if v is not None else '-'}"
        )
    for blob in env["blobs"]:
        can = {True: "loads", False: "REFUSED", None: "unknown"}[blob["loadable"]]
        inputs = ", ".join(
            f"{n}={'x'.join(map(str, s))}" for n, s in (blob["inputs"] or {}).items()
        )
        print(
            f"blob {blob['key'][:12]}  {can:8} built by rknn-toolkit2 {blob['toolkit'] or '?'} "
            f"for {','.join(blob['targets']) or '?'}  {blob['model']}  [{inputs}]"
        )
    for note in env["notes"]:
        print(f"note: {note}")
    return 0
