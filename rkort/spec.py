"""What to build: a :class:`BuildSpec` (model file, static I/O, target, dtypes), and how a build fails.

Every room that compiles, caches or runs a blob speaks in BuildSpecs; the errors here are what the
converter's refusals, crashes and absences become.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import sha256_file
from .platform import SUPPORTED_TARGETS

# Bump when a change here changes the blobs built from the same BuildSpec.
_RECIPE_VERSION = 1


_QUANTIZED_DTYPES = ("w8a8", "w8a16", "w16a16i_dfp", "w4a16")

#: The targets rknn-toolkit2 2.5.0 takes each quantized dtype for (None: every target); its
#: config() refuses the others (``The quantized_dtype = 'w8a16' not support in 'rk3588'!``).
QUANTIZED_TARGETS: dict[str, tuple[str, ...] | None] = {
    "w8a8": None,
    "w16a16i_dfp": None,
    "w8a16": ("rk3562",),
    "w4a16": ("rk3576", "rv1126b"),
}
_ALGORITHMS = ("normal", "mmse", "kl_divergence")
_METHODS = ("channel", "layer")
#: ``hybrid``: "auto", the toolkit's automatic hybrid quantization (``build(auto_hybrid=True)``);
#: "layers" and "layers-strict", the layers ``float_layers`` names kept in float16
#: (``hybrid_quantization_step2``), chosen by the toolkit's per-layer accuracy analysis when none
#: are named (fewer of them, or more: see :data:`rkort.toolkit.protocol.LAYER_SELECTION`).
_HYBRIDS = ("auto", "layers", "layers-strict")


_FLOAT_DTYPES = ("float16",)


class CompileError(Exception):
    """rknn-toolkit2 could not turn a model into a blob.

    ``stage`` names the step that failed ("loading", "building", ...) and ``toolkit_errors`` holds
    the error lines the toolkit printed last, which ``str()`` already includes.
    """

    def __init__(
        self, message: str, *, stage: str | None = None, toolkit_errors: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.toolkit_errors = toolkit_errors


class CalibrationError(CompileError):
    """The calibration data cannot calibrate this build: none recorded, none that fits the shape
    being built, or feeds that are not the model's inputs (a problem of the data, not of the
    graph: no node is blamed for it)."""


class ToolkitNotInstalled(CompileError):
    """rknn-toolkit2 cannot be imported by the Python that runs the conversion."""


class BuildFailed(CompileError):
    """The toolkit refused the model: a ValueError or a -1 return from config/load/build/export."""


class ConverterCrashed(CompileError):
    """The conversion process died by a signal (SIGABRT, SIGSEGV, ...) or exited unexpectedly."""


class CompileTimeout(CompileError):
    """The conversion took longer than the caller's timeout and was stopped."""


@dataclass(frozen=True)
class BuildSpec:
    """Everything the converter needs to build one blob: a model file, static I/O, target, dtypes."""

    model_path: str
    input_names: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[str, ...]
    target: str = "rk3588"
    float_dtype: str = "float16"
    quantized_dtype: str | None = None
    dataset: str | None = None
    optimization_level: int = 3
    #: Extra static input-shape sets compiled into the same blob (the toolkit's ``dynamic_input``);
    #: empty for a single-shape blob. ``input_shapes`` is always one of them.
    dynamic_input: tuple[tuple[tuple[int, ...], ...], ...] = ()
    #: The toolkit's quantized_algorithm and quantized_method (quantized builds).
    quant_algorithm: str = "normal"
    quant_method: str = "channel"
    #: A digest of the calibration data rkort calibrates each part from (None: the toolkit's
    #: ``dataset`` file is the calibration, as given); a part's own dataset file is attached as
    #: ``dataset`` when it is built.
    calibration: str | None = None
    #: Below this cosine to onnxruntime a quantized build is replaced (hybrid, then fp16).
    min_cosine: float | None = None
    #: What was built when the plain quantized build fell short (see _HYBRIDS); float16 layers.
    hybrid: str | None = None
    float_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Normalize list forms so the spec hashes and compares by value.
        for name in ("input_names", "input_dtypes", "output_names", "output_dtypes"):
            object.__setattr__(self, name, tuple(str(x) for x in getattr(self, name)))
        for name in ("input_shapes", "output_shapes"):
            object.__setattr__(
                self, name, tuple(tuple(int(d) for d in s) for s in getattr(self, name))
            )
        object.__setattr__(
            self,
            "dynamic_input",
            tuple(
                tuple(tuple(int(d) for d in shape) for shape in group)
                for group in self.dynamic_input
            ),
        )
        object.__setattr__(self, "target", self.target.lower())
        object.__setattr__(self, "float_layers", tuple(str(x) for x in self.float_layers))
        if not (len(self.input_names) == len(self.input_shapes) == len(self.input_dtypes)):
            raise ValueError(
                "BuildSpec: input_names, input_shapes and input_dtypes differ in length"
            )
        if not (len(self.output_names) == len(self.output_shapes) == len(self.output_dtypes)):
            raise ValueError(
                "BuildSpec: output_names, output_shapes and output_dtypes differ in length"
            )
        if any(d < 0 for s in self.input_shapes for d in s):
            raise ValueError(f"BuildSpec: input shapes must be static, got {self.input_shapes}")
        if self.target not in SUPPORTED_TARGETS:
            raise ValueError(
                f"BuildSpec: unknown target {self.target!r}; rknn-toolkit2 accepts "
                f"{list(SUPPORTED_TARGETS)}"
            )
        if self.float_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"BuildSpec: float_dtype must be one of {list(_FLOAT_DTYPES)}")
        if self.quantized_dtype is not None:
            if self.quantized_dtype not in _QUANTIZED_DTYPES:
                raise ValueError(
                    f"BuildSpec: quantized_dtype {self.quantized_dtype!r} is not one of "
                    f"{list(_QUANTIZED_DTYPES)}"
                )
            if not (self.dataset or self.calibration):
                raise ValueError("BuildSpec: a quantized build needs a calibration dataset file")
            refusal = dtype_refusal(self.quantized_dtype, self.target)
            if refusal:
                raise ValueError(f"BuildSpec: {refusal}")
            if self.quant_algorithm not in _ALGORITHMS or self.quant_method not in _METHODS:
                raise ValueError(
                    f"BuildSpec: quant_algorithm must be one of {list(_ALGORITHMS)} and "
                    f"quant_method one of {list(_METHODS)}"
                )
            if self.hybrid is not None and self.hybrid not in _HYBRIDS:
                raise ValueError(f"BuildSpec: hybrid must be None or one of {list(_HYBRIDS)}")

    @property
    def model_name(self) -> str:
        return os.path.basename(self.model_path)

    def key_parts(self) -> dict[str, Any]:
        """What changes the blob, except the model's content and the toolkit version.

        The calibration dataset counts by content (its file and every sample it lists), and so
        does the calibration data of a quantized build (its digest), with how it is quantized.
        """
        parts = {
            "recipe": _RECIPE_VERSION,
            "inputs": [
                [n, list(s), d]
                for n, s, d in zip(self.input_names, self.input_shapes, self.input_dtypes)
            ],
            "outputs": [
                [n, list(s), d]
                for n, s, d in zip(self.output_names, self.output_shapes, self.output_dtypes)
            ],
            "target": self.target,
            "float_dtype": self.float_dtype,
            "quantized_dtype": self.quantized_dtype,
            "dataset": dataset_digest(self.dataset) if self.quantized_dtype else None,
            "optimization_level": self.optimization_level,
            "dynamic_input": [[list(shape) for shape in group] for group in self.dynamic_input],
        }
        if self.quantized_dtype:
            parts["quantization"] = self.quantization()
        return parts

    def quantization(self) -> dict[str, Any]:
        """How a quantized build is calibrated and checked (JSON data; {} for a float build)."""
        if not self.quantized_dtype:
            return {}
        return {
            "quant_algorithm": self.quant_algorithm,
            "quant_method": self.quant_method,
            "calibration": self.calibration,
            "min_cosine": self.min_cosine,
            "hybrid": self.hybrid,
            "float_layers": list(self.float_layers),
        }

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON data, without its model file (a record names the file by role)."""
        return {
            "input_names": list(self.input_names),
            "input_shapes": [list(s) for s in self.input_shapes],
            "input_dtypes": list(self.input_dtypes),
            "output_names": list(self.output_names),
            "output_shapes": [list(s) for s in self.output_shapes],
            "output_dtypes": list(self.output_dtypes),
            "dynamic_input": [[list(shape) for shape in group] for group in self.dynamic_input],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], model_path: str, **config: Any) -> BuildSpec:
        """The spec :meth:`to_json` gave, for ``model_path`` and the build ``config``
        (target, dtypes, dataset, optimization level); how a quantized build was calibrated
        comes from ``config``, else from ``data`` (a blob's recipe holds it)."""
        for name, value in dict(data.get("quantization") or {}).items():
            if name in _QUANT_FIELDS and name not in config:
                config[name] = tuple(value) if name == "float_layers" else value
        return cls(
            model_path=model_path,
            input_names=tuple(data["input_names"]),
            input_shapes=tuple(tuple(s) for s in data["input_shapes"]),
            input_dtypes=tuple(data["input_dtypes"]),
            output_names=tuple(data["output_names"]),
            output_shapes=tuple(tuple(s) for s in data["output_shapes"]),
            output_dtypes=tuple(data["output_dtypes"]),
            dynamic_input=tuple(data.get("dynamic_input", ())),
            **config,
        )


_QUANT_FIELDS = (
    "quant_algorithm",
    "quant_method",
    "calibration",
    "min_cosine",
    "hybrid",
    "float_layers",
)


def dtype_refusal(dtype: str, target: str) -> str | None:
    """Why rknn-toolkit2 refuses the quantized ``dtype`` for ``target`` (None: it takes it)."""
    if dtype not in QUANTIZED_TARGETS:
        return f"quantized dtype {dtype!r} is not one of {list(QUANTIZED_TARGETS)}"
    targets = QUANTIZED_TARGETS[dtype]
    if targets is not None and target.lower() not in targets:
        return f"{dtype} is for {', '.join(targets)} only, not {target}"
    return None


def dataset_samples(dataset: str) -> list[list[str]]:
    """The calibration samples of a toolkit dataset file, with every path made absolute.

    The toolkit reads one sample a line, space-separated paths (one per input). Relative paths are
    taken from the dataset file's folder when they exist there, else from the current directory.
    """
    base = Path(dataset).resolve().parent
    samples = []
    for line in Path(dataset).read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        sample = []
        for part in parts:
            p = Path(part)
            if not p.is_absolute():
                p = base / p if (base / p).exists() else Path.cwd() / p
            sample.append(str(p))
        samples.append(sample)
    return samples


def dataset_digest(dataset: str | None) -> str | None:
    if not dataset:
        return None
    h = hashlib.sha256()
    for sample in dataset_samples(dataset):
        h.update(b"\n")
        for path in sample:
            h.update(b" ")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def data_formats(shapes: Sequence[Sequence[int]]) -> list[str]:
    """The toolkit's per-input layout: ONNX 4-D inputs are NCHW (it would assume NHWC).

    Given for every input (it only matters for 4-D ones): without it the toolkit prints a warning
    on every call.
    """
    return ["nchw" if len(s) == 4 else "nhwc" for s in shapes]


def build_recipe(
    spec: BuildSpec,
    *,
    kind: str = "model",
    model: str | None = None,
    model_sha256: str | None = None,
    signature: Mapping[str, Sequence[int]] | None = None,
    segment: Mapping[str, Any] | None = None,
    file_sha256: str | None = None,
) -> dict[str, Any]:
    """What a blob is built from, for its cache entry's metadata: the ONNX file (and its sha256)
    and the BuildSpec; for a segment or a lowered model (``kind``), also the model and what cuts
    the file from it again. A board rehearsal rebuilds the blob's graph from this."""
    path = os.path.abspath(spec.model_path)
    return {
        "file": path,
        "file_sha256": file_sha256 or sha256_file(path)[0],
        "spec": {
            **spec.to_json(),
            "target": spec.target,
            "float_dtype": spec.float_dtype,
            "quantized_dtype": spec.quantized_dtype,
            "dataset": spec.dataset,
            "optimization_level": spec.optimization_level,
            "quantization": spec.quantization(),
        },
        "kind": kind,
        "model": model,
        "model_sha256": model_sha256,
        "signature": [[n, list(s)] for n, s in (signature or {}).items()],
        "segment": dict(segment) if segment is not None else None,
    }
