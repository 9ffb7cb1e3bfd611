"""The toolkit's console output: forwarded line by line to the ``rkort.toolkit`` logger, its last
lines kept for error messages, and a progress line on a terminal while it works."""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import threading
from collections.abc import Sequence
from typing import IO

toolkit_log = logging.getLogger("rkort.toolkit")

_ANSI = re.compile(rb"\x1b\[[0-9;]*m")


# The toolkit's tqdm bars end with '\r' and its next message often follows without a newline.
_LINE_BREAK = re.compile(rb"\r\n|\r|\n|(?=\x1b\[1;3\dm[EWID]\x1b\[0m )")


_PROGRESS_LINE = re.compile(r"\d+%\|.*\|")


_KEEP_LINES = 400


class Tail:
    """The child's last output lines (progress bars left out), shared with the reader thread."""

    def __init__(self) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=_KEEP_LINES)
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)


def forward_output(stream: IO[bytes], keep: Tail, label: str) -> None:
    """Send the child's console output to the rkort.toolkit logger, one line at a time."""
    pending = b""
    fd = stream.fileno()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if chunk:
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r"))
            if cut < 0:
                continue
            complete, pending = pending[: cut + 1], pending[cut + 1 :]
        else:
            complete, pending = pending, b""
        for raw in _LINE_BREAK.split(complete):
            line = _ANSI.sub(b"", raw).decode("utf-8", "replace").rstrip()
            if not line.strip():
                continue
            toolkit_log.debug("%s: %s", label, line)
            if not _PROGRESS_LINE.search(line):
                keep.append(line)
        if not chunk:
            return


def toolkit_errors(lines: Sequence[str], limit: int = 5) -> list[str]:
    """The toolkit's error lines (``E ...`` and their continuations), newest last, without noise."""
    lines = list(lines)
    found: list[str] = []
    for i, line in enumerate(lines):
        if not line.startswith("E "):
            continue
        text = re.sub(r"^RKNN: \[[\d:.]+\]\s*", "RKNN: ", line[2:].strip())
        if (
            "Unkown op target" in text
            or text.startswith("rknn-toolkit2 version")
            or "Traceback (most recent call last)" in text
        ):
            continue
        for more in lines[i + 1 :]:
            if not more.startswith(" ") or more.lstrip().startswith("File "):
                break
            text += " " + more.strip()
        text = " ".join(text.split())
        if text not in found:
            found.append(text)
    return found[-limit:]


class Progress:
    """A one-line tqdm indicator naming the current stage, on stderr (only a terminal by default)."""

    def __init__(self, show: bool | None, desc: str, total: int) -> None:
        if show is None:
            show = sys.stderr is not None and sys.stderr.isatty()
        self._desc = desc
        self._bar = None
        if show:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=f"{desc}: starting the toolkit",
                file=sys.stderr,
                leave=False,
                bar_format="{desc} ({n_fmt}/{total_fmt}, {elapsed})",
            )

    def advance(self, stage: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(f"{self._desc}: {stage}", refresh=False)
            self._bar.update(1)

    def refresh(self) -> None:
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
