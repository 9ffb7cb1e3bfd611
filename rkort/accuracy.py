"""How close a build's outputs are to onnxruntime's: the cosine of each output per sample, and
for class scores whether the top class agrees.

A sample's output is compared whole (flattened, as float64): the cosine says how much of the
output's direction survives. A classifier's output ([batch, classes], with 2 to 1000 classes) is
also read as class scores: the share of rows whose arg-max agrees is reported as ``labels``
(hidden states, [batch, sequence, hidden], are not scores). The verdict against ``min_cosine`` takes the worst
cosine of any output on any sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: A last dim in this range is read as class scores.
CLASSES = (2, 1000)


@dataclass(frozen=True)
class OutputFigures:
    """One output over the measured samples."""

    name: str
    cosine_min: float
    cosine_mean: float
    #: Share of rows whose arg-max agrees (class-score-like outputs only).
    labels: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cosine_min": round(self.cosine_min, 6),
            "cosine_mean": round(self.cosine_mean, 6),
            "labels": None if self.labels is None else round(self.labels, 6),
        }


@dataclass(frozen=True)
class Figures:
    """Every output of one build over ``samples`` samples (``in_sample``: samples it was also
    calibrated on, when none was held out)."""

    outputs: tuple[OutputFigures, ...]
    samples: int
    in_sample: bool = False

    @property
    def cosine_min(self) -> float:
        return min((o.cosine_min for o in self.outputs), default=1.0)

    @property
    def cosine_mean(self) -> float:
        if not self.outputs:
            return 1.0
        return float(np.mean([o.cosine_mean for o in self.outputs]))

    def passes(self, min_cosine: float) -> bool:
        return self.cosine_min >= min_cosine

    def summary(self) -> str:
        """``cosine 0.9931 min / 0.9962 mean over 8 held-out samples`` (labels where read)."""
        where = "calibration" if self.in_sample else "held-out"
        text = (
            f"cosine {self.cosine_min:.4f} min / {self.cosine_mean:.4f} mean over "
            f"{self.samples} {where} sample{'s' if self.samples != 1 else ''}"
        )
        labels = [o.labels for o in self.outputs if o.labels is not None]
        if labels:
            text += f", labels {100 * min(labels):.1f} % agree"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "cosine_min": round(self.cosine_min, 6),
            "cosine_mean": round(self.cosine_mean, 6),
            "samples": self.samples,
            "in_sample": self.in_sample,
            "outputs": [o.to_json() for o in self.outputs],
        }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The cosine of two arrays taken whole; 1.0 for two zero arrays, 0.0 for one, and 0.0
    where either holds a non-finite value."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return 0.0
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 or ny == 0.0:
        return 1.0 if nx == ny else 0.0
    return float(np.clip(x @ y / (nx * ny), -1.0, 1.0))


def label_agreement(want: np.ndarray, got: np.ndarray) -> float | None:
    """Share of rows whose arg-max over the last axis agrees; None unless the output is a
    classifier's ([classes] or [batch, classes], with a plausible number of classes)."""
    if not 1 <= want.ndim <= 2 or want.shape != got.shape:
        return None
    if not CLASSES[0] <= want.shape[-1] <= CLASSES[1]:
        return None
    rows_want = np.asarray(want).reshape(-1, want.shape[-1]).argmax(axis=1)
    rows_got = np.asarray(got).reshape(-1, got.shape[-1]).argmax(axis=1)
    return float((rows_want == rows_got).mean()) if len(rows_want) else None


def compare(
    names: Sequence[str],
    reference: Sequence[Sequence[np.ndarray]],
    got: Sequence[Sequence[np.ndarray]],
    in_sample: bool = False,
) -> Figures:
    """Figures of ``got`` against ``reference``: one list of outputs (in ``names`` order) per
    sample each."""
    outputs = []
    for k, name in enumerate(names):
        cosines = [cosine(r[k], g[k]) for r, g in zip(reference, got)]
        agree = [
            label_agreement(np.asarray(r[k]), np.asarray(g[k])) for r, g in zip(reference, got)
        ]
        labels = [a for a in agree if a is not None]
        outputs.append(
            OutputFigures(
                name,
                min(cosines, default=1.0),
                float(np.mean(cosines)) if cosines else 1.0,
                float(np.mean(labels)) if labels else None,
            )
        )
    return Figures(tuple(outputs), len(reference), in_sample)
