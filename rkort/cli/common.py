"""What every ``rkort`` subcommand shares: the usage error, and parsers for shapes, sizes and ages."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


_AGES = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(Exception):
    """A mistake on the command line, reported without a traceback."""


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME=1x128`` -> ("NAME", (1, 128))."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims.strip()):
        raise argparse.ArgumentTypeError(
            f"expected NAME=DIMxDIM..., e.g. input_ids=1x128, got {text!r}"
        )
    return name, tuple(int(d) for d in dims.strip().split("x"))


def parse_dim(text: str) -> tuple[str, int]:
    """``NAME=1500`` -> ("NAME", 1500): a named dynamic dim's size."""
    name, sep, size = text.rpartition("=")
    if not sep or not name or not size.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"expected NAME=SIZE, e.g. encoder_sequence_length=1500, got {text!r}"
        )
    return name, int(size)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 500M or 2G, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"expected an age such as 12h or 30d, got {text!r}")
    return float(m.group(1)) * _AGES[m.group(2) or "s"]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
