"""What an RKNN blob says about itself, read without the toolkit: the JSON trailer after its
flatbuffer names the toolkit version that built it, its target platforms and its I/O tensors.

Layout (rknn-toolkit2 2.5.0): bytes 0-3 ``RKNN``, 8-15 the format version (u64), 16-23 the length
of a flatbuffer at offset 64 (u64), then a u64 length and the JSON trailer.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Union

_HEADER = 64
_MAX_TRAILER = 64 << 20


class BlobFormatError(ValueError):
    """The bytes are not an RKNN blob this reader understands."""


@dataclass(frozen=True)
class BlobInfo:
    """``version``: the rknn-toolkit2 that built the blob; ``targets``: the platforms it runs on;
    ``format``: the container's format version; ``inputs``/``outputs``: (name, element shape)."""

    version: str
    targets: tuple[str, ...]
    format: int
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    outputs: tuple[tuple[str, tuple[int, ...]], ...]
    trailer: dict[str, Any]


def read_blob_info(source: Union[str, os.PathLike[str], bytes]) -> BlobInfo:
    """The facts an RKNN blob (a path or its bytes) states in its trailer. Only the header and
    the trailer of a file are read, not the weights between them."""
    if isinstance(source, bytes):
        fmt, raw = _trailer(lambda at, n: source[at : at + n])
    else:
        with open(source, "rb") as f:

            def read(at: int, n: int) -> bytes:
                f.seek(at)
                return f.read(n)

            fmt, raw = _trailer(read)
    try:
        trailer = json.loads(raw)
    except ValueError as e:
        raise BlobFormatError(f"the RKNN blob's trailer is not JSON ({e})") from None
    if not isinstance(trailer, dict):
        raise BlobFormatError("the RKNN blob's trailer is not a JSON object")
    tensors = {t.get("tensor_id"): t for t in trailer.get("norm_tensor", []) if isinstance(t, dict)}

    def io(side: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
        found = []
        for link in trailer.get("graph", []):
            if isinstance(link, dict) and link.get("left") == side:
                t = tensors.get(link.get("right_tensor_id"), {})
                found.append((str(t.get("url", "")), tuple(int(d) for d in t.get("size", []))))
        return tuple(found)

    targets = trailer.get("target_platform", [])
    return BlobInfo(
        version=str(trailer.get("version", "")),
        targets=tuple(
            str(t).lower() for t in (targets if isinstance(targets, list) else [targets])
        ),
        format=fmt,
        inputs=io("input"),
        outputs=io("output"),
        trailer=trailer,
    )


def _trailer(read: Any) -> tuple[int, bytes]:
    head = read(0, _HEADER)
    if len(head) < 24 or head[:4] != b"RKNN":
        raise BlobFormatError("not an RKNN blob (no 'RKNN' header)")
    fmt, flat = struct.unpack_from("<QQ", head, 8)
    at = _HEADER + flat
    size_bytes = read(at, 8)
    if len(size_bytes) < 8:
        raise BlobFormatError("truncated RKNN blob (the trailer is missing)")
    (size,) = struct.unpack("<Q", size_bytes)
    raw = read(at + 8, size) if size <= _MAX_TRAILER else b""
    if size > _MAX_TRAILER or len(raw) < size:
        raise BlobFormatError("truncated RKNN blob (the trailer is cut short)")
    return int(fmt), raw


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.5.0"`` -> (2, 5, 0); the numbers of a version string, for comparisons."""
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def runtime_can_load(blob_version: str, runtime_version: str | None) -> bool | None:
    """Whether a librknnrt of ``runtime_version`` loads a blob built by ``blob_version`` (a runtime
    older than the toolkit refuses it); None when either version is unknown."""
    if not blob_version or not runtime_version:
        return None
    return version_tuple(runtime_version) >= version_tuple(blob_version)
