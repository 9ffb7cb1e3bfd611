"""Compile one ONNX graph with static shapes into an RKNN blob, in a child process.

rknn-toolkit2 prints to the process's stdout (also from C), writes files into the current directory
and can abort the whole process, so every conversion runs in ``python -m rkort._worker compile`` with
a temporary working directory of its own. The child's console output goes to the
``rkort.toolkit`` logger at DEBUG; its failures come back as :class:`CompileError` subclasses.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .platform import SUPPORTED_TARGETS

# Bump when a change here changes the blobs built from the same BuildSpec.
_RECIPE_VERSION = 1
_QUANTIZED_DTYPES = ("w8a8", "w8a16", "w16a16i_dfp", "w4a16")
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
            if not self.dataset:
                raise ValueError("BuildSpec: a quantized build needs a calibration dataset file")

    @property
    def model_name(self) -> str:
        return os.path.basename(self.model_path)

    def key_parts(self) -> dict[str, Any]:
        """What changes the blob, except the model's content and the toolkit version.

        The calibration dataset counts by content (its file and every sample it lists).
        """
        return {
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
            "dataset": _dataset_digest(self.dataset) if self.quantized_dtype else None,
            "optimization_level": self.optimization_level,
            "dynamic_input": [[list(shape) for shape in group] for group in self.dynamic_input],
        }


def toolkit_version() -> str | None:
    """The installed rknn-toolkit2 version (from its metadata; the toolkit is not imported)."""
    try:
        return importlib.metadata.version("rknn-toolkit2")
    except importlib.metadata.PackageNotFoundError:
        return None


def compile_blob(
    spec: BuildSpec,
    dest: Path,
    *,
    progress: bool | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Build ``spec`` into an RKNN blob at ``dest`` in a child process.

    ``dest`` is written (atomically) only after a successful export. ``progress=None`` shows a
    progress line on stderr when stderr is a terminal. Returns ``{"build_seconds",
    "toolkit_version", "seconds", "blob_bytes"}``; raises a :class:`CompileError` subclass.
    """
    from . import _worker

    started = time.monotonic()
    worker = _worker.WorkerProcess(
        "compile",
        _worker.build_request(spec, export=True),
        subject=f"{spec.model_name} for {spec.target}",
        progress=progress,
    )
    try:
        info = worker.wait_until("done", timeout=timeout)
        place_file(worker.workdir / info["blob"], Path(dest))
    finally:
        worker.close()
    return {
        "build_seconds": info["build_seconds"],
        "toolkit_version": info["toolkit_version"],
        "seconds": time.monotonic() - started,
        "blob_bytes": Path(dest).stat().st_size,
    }


def place_file(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest`` so that ``dest`` is either absent or complete, across filesystems.

    If ``dest`` cannot be written (a full or read-only disk), the blob is moved into a private
    temporary directory instead and :class:`rkort.cache.BlobNotWritten` names it, so that the
    cache can keep it rather than compile it again.
    """
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
    blob = src  # where the complete blob is now
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Same filesystem: one rename, no copy and no extra space.
            os.rename(src, tmp)
            blob = tmp
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        if blob != tmp:
            _unlink(tmp)  # a partial copy
        raise _rescue(blob, dest, exc) from exc
    except BaseException:
        _unlink(tmp)
        raise
    if blob == src:
        _unlink(src)


def _rescue(blob: Path, dest: Path, exc: OSError) -> OSError:
    """``blob`` moved into a private directory, as a BlobNotWritten; ``exc`` if it cannot be."""
    from .cache import BlobNotWritten

    if not os.path.isfile(blob):
        return exc
    try:
        keep = Path(tempfile.mkdtemp(prefix="rkort-blob-")) / dest.name
    except OSError:
        return exc
    try:
        try:
            os.rename(blob, keep)
        except OSError:
            shutil.copyfile(blob, keep)
            _unlink(blob)
    except OSError:
        shutil.rmtree(keep.parent, ignore_errors=True)
        return exc
    return BlobNotWritten(exc.errno, exc.strerror or str(exc), keep, dest)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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


def _dataset_digest(dataset: str | None) -> str | None:
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
