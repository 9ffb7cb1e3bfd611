"""Hybrid quantization inside the toolkit child: layers kept in float16 through the toolkit's
``hybrid_quantization_step1``/``step2``, chosen from its per-layer accuracy analysis.

A quantized transformer loses most of its accuracy in a few kinds of layers (the fused attention
with its mask arithmetic, LayerNorm, GELU, the residual adds, the projection after a float
neighbour); which ones is measured, not guessed: the toolkit's ``accuracy_analysis`` compares
each layer of the quantized build to its float model on a calibration sample, and every layer
whose single-layer cosine is below a threshold is kept in float16. Keeping a layer in float16
changes what its neighbours lose (their int8 inputs now come from a float16 tensor), so the
analysis is repeated on the new build, a few rounds at most.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: ``[OpType] name  entire_cos | entire_euc  single_cos | single_euc`` in error_analysis.txt.
_ROW = re.compile(r"^\[(\w+)\]\s+(\S+)\s+(\S+)\s*\|\s*(\S+)\s+(\S+)\s*\|\s*(\S+)")
_CFG_LAYER = re.compile(r"^    (\S.*?):[ \t]*$", re.M)
_EMPTY = "custom_quantize_layers: {}\n"

Check = Callable[..., Any]


def analysis_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of the toolkit's ``error_analysis.txt``: op type, layer (tensor) name, and the
    cosine to the float model of the layer's output with the errors before it (``entire``) and
    of the layer alone (``single``); None where the toolkit printed no number."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        m = _ROW.match(line.strip())
        if m:
            rows.append(
                {
                    "op": m.group(1),
                    "layer": m.group(2),
                    "entire": _number(m.group(3)),
                    "single": _number(m.group(5)),
                }
            )
    return rows


def analyse(check: Check, rknn: Any, samples: Sequence[Sequence[str]], where: Path) -> list[dict]:
    """Per-layer figures of a built model on ``samples`` (the worst over them per layer); the
    toolkit's large dumps go to ``where`` and are removed."""
    worst: dict[str, dict[str, Any]] = {}
    for k, sample in enumerate(samples):
        out = where / f"analysis-{k}"
        check(
            "accuracy_analysis()", rknn.accuracy_analysis, inputs=list(sample), output_dir=str(out)
        )
        for row in analysis_rows(out / "error_analysis.txt"):
            seen = worst.setdefault(row["layer"], row)
            for field in ("entire", "single"):
                if row[field] is not None and (seen[field] is None or row[field] < seen[field]):
                    seen[field] = row[field]
        shutil.rmtree(out, ignore_errors=True)
    return list(worst.values())


def layered_build(
    check: Check,
    new_rknn: Callable[[], Any],
    loaded: Any,
    dataset: str,
    samples: Sequence[Sequence[str]],
    float_layers: Sequence[str],
    thresholds: Sequence[float],
    rounds: int,
    goal: float | None = None,
    margin: float = 1.0,
    outputs: Sequence[str] = (),
) -> tuple[Any, list[str]]:
    """Build with ``float_layers`` in float16, or (none named) with the layers the accuracy
    analysis finds below the first of ``thresholds`` (the next one when none is below it), round
    after round until the analysed ``outputs`` are within ``margin`` times ``goal``'s error budget
    of the float model (one analysed sample stands for the held-out ones). ``loaded`` is
    a configured RKNN with the model loaded (released here); ``new_rknn()`` makes a configured
    one. Returns the built RKNN and the layers kept in float16."""
    where = Path("hybrid").resolve()
    where.mkdir(exist_ok=True)
    here = os.getcwd()
    os.chdir(where)
    try:
        check("hybrid_quantization_step1()", loaded.hybrid_quantization_step1, dataset=dataset)
    finally:
        os.chdir(here)
    loaded.release()
    (cfg_path,) = where.glob("*.quantization.cfg")
    stem = cfg_path.name[: -len(".quantization.cfg")]
    model, data = where / f"{stem}.model", where / f"{stem}.data"
    base = cfg_path.read_text()
    eligible = {_unquoted(n) for n in _CFG_LAYER.findall(base)}
    keep = [n for n in float_layers if n in eligible]
    custom = where / "custom.quantization.cfg"

    def build(layers: Sequence[str]) -> Any:
        custom.write_text(_with_layers(base, layers))
        rknn = new_rknn()
        check(
            "hybrid_quantization_step2()",
            rknn.hybrid_quantization_step2,
            model_input=str(model),
            data_input=str(data),
            model_quantization_cfg=str(custom),
        )
        return rknn

    if float_layers:
        return build(keep), keep
    level = 0
    for _ in range(rounds):
        rknn = build(keep)
        rows = analyse(check, rknn, samples[:1], where)
        rknn.release()
        if goal is not None and _output_cosine(rows, outputs) >= 1 - (1 - goal) * margin:
            break
        added: list[str] = []
        while level < len(thresholds) and not added:
            added = [
                r["layer"]
                for r in rows
                if r["single"] is not None
                and r["single"] < thresholds[level]
                and r["layer"] in eligible
                and r["layer"] not in keep
            ]
            if not added:
                level += 1
        if not added:
            break
        keep += added
    return build(keep), keep


def _output_cosine(rows: Sequence[dict[str, Any]], outputs: Sequence[str]) -> float:
    """The worst cosine to the float model of the analysed outputs (of the last layer when the
    analysis names none of them)."""
    found = [r["entire"] for r in rows if r["layer"] in outputs and r["entire"] is not None]
    if not found:
        found = [r["entire"] for r in rows[-1:] if r["entire"] is not None]
    return min(found, default=0.0)


def _with_layers(cfg: str, layers: Sequence[str]) -> str:
    if not layers:
        return cfg
    body = "custom_quantize_layers:\n" + "".join(
        f"    {json.dumps(name)}: float16\n" for name in layers
    )
    if _EMPTY in cfg:
        return cfg.replace(_EMPTY, body, 1)
    return body + cfg


def _unquoted(name: str) -> str:
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"":
        return name[1:-1]
    return name


def _number(text: str) -> float | None:
    """A cosine as the analysis prints it: ``q_zero`` (the quantized layer gives zeros where the
    float one does not) is a total loss; ``f_zero`` (the float layer gives zeros) says nothing."""
    if text == "q_zero":
        return 0.0
    try:
        return float(text)
    except ValueError:
        return None
