"""The board rehearsal's report: every rehearsed process writes its sessions' figures at exit
(:func:`rkort.stats.write_process_report`); ``rkort run --board`` gathers and prints them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any


def gather(directory: Path) -> list[dict[str, Any]]:
    """Every session's figures written into ``directory``, process by process."""
    sessions: list[dict[str, Any]] = []
    for path in sorted(Path(directory).glob("process-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for s in data.get("sessions", []):
            sessions.append({**s, "pid": data.get("pid")})
    return sessions


def format_report(soc: str, sessions: list[dict[str, Any]]) -> str:
    """The text ``rkort run --board`` prints at exit."""
    npu = sum(s["npu_calls"] for s in sessions)
    cpu = sum(s["cpu_calls"] for s in sessions)
    compiles = sum(s["compiles"] for s in sessions)
    loaded = sum(s["blobs_loaded"] for s in sessions)
    processes = len({s.get("pid") for s in sessions})
    lines = [
        f"rkort board rehearsal ({soc}): {len(sessions)} session(s) in {processes} process(es); "
        f"{npu + cpu} call(s): {npu} on the NPU, {cpu} on the CPU; {compiles} compile(s), "
        f"{loaded} blob(s) loaded"
    ]
    for s in sessions:
        providers = ", ".join(s.get("providers") or []) or "-"
        line = f"  {s['model']} [{providers}]: {s['npu_calls']} NPU, {s['cpu_calls']} CPU"
        lines.append(line)
        for reason, count in Counter(s.get("cpu_reasons") or {}).most_common():
            lines.append(f"      CPU x{count}: {reason}")
    missing = [(s["model"], m) for s in sessions for m in s.get("missing_shapes") or []]
    if missing:
        lines.append("shapes missing from the cache (warm them on a build host):")
        for model, m in missing:
            lines.append(f"  {model} {m['shape']} ({m['calls']} call(s)): {m['warmup']}")
    if not sessions:
        lines.append("  (no onnxruntime session was created)")
    return "\n".join(lines)
