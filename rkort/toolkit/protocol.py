"""What a toolkit worker is asked to do, and the names parent and child agree on.

Protocol (parent -> child first): a request dict from :func:`build_request`; the child answers
``("stage", name)`` as it goes, then ``("done", info)`` (compile) or ``("ready", info)`` (serve), or
``("error", kind, stage, reason)``. A serving child then answers each ``("run", arrays)`` with
``("ok", arrays)`` or ``("failed", reason)`` until ``("close",)`` or the socket closes; a run
message may carry the toolkit's ``data_format`` as a third item (None: 4-D inputs are NCHW).
"""

from __future__ import annotations

import os
from typing import Any

from ..spec import BuildSpec, dataset_samples

BLOB_NAME = "model.rknn"
WORKDIR_PREFIX = "rkort-toolkit-"
DATASET_NAME = "dataset.txt"
# The pid of the process that started the worker: the child cannot learn it from getppid() alone,
# since the parent may already be gone (and the child re-parented) by the time it looks.
PARENT_ENV = "RKORT_WORKER_PARENT"
#: The module the child runs as (``python -m``).
CHILD_MODULE = "rkort.toolkit.child"


#: How a layer-wise hybrid build chooses its float16 layers, by the spec's ``hybrid``:
#: (thresholds, rounds, margin). The layers whose single-layer cosine (the toolkit's accuracy
#: analysis, against its float model) is below the first threshold stay in float16 (below the
#: next one when none is below it); the analysis is repeated on the new build, at most ``rounds``
#: times (a float16 neighbour changes what a layer's int8 input loses), until the analysed outputs
#: are within ``margin`` times min_cosine's error budget. "layers" keeps few layers (the smallest
#: blob that may pass); "layers-strict", tried when it does not pass, keeps more.
LAYER_SELECTION: dict[str, tuple[tuple[float, ...], int, float]] = {
    "layers": ((0.999,), 2, 1.0),
    "layers-strict": ((0.999, 0.9995, 0.9999), 4, 0.5),
}


def build_request(
    spec: BuildSpec,
    *,
    export: bool,
    runtime: dict[str, Any] | None = None,
    analyse: list[list[str]] | None = None,
) -> dict[str, Any]:
    """The first message to a worker: what to build (paths made absolute) and what to do after.

    ``runtime`` None: build (and export) only. ``{"target": None}``: build, then start the
    simulator. ``{"blob": path, "target": t, "device_id": d}``: load a blob and run it on a board.
    ``analyse``: samples (.npy paths, one per input) for the toolkit's per-layer accuracy
    analysis of the build, reported as ``info["layers"]``.

    A quantized spec without its calibration set attached (a trial build, which only asks
    whether the converter takes the graph) is built in float16.
    """
    quantized = spec.quantized_dtype if spec.dataset else None
    return {
        "model_path": os.path.abspath(spec.model_path),
        "input_names": list(spec.input_names),
        "input_shapes": [list(s) or [1] for s in spec.input_shapes],
        "output_names": list(spec.output_names),
        "output_shapes": [list(s) or [1] for s in spec.output_shapes],
        "target": spec.target,
        "float_dtype": spec.float_dtype,
        "quantized_dtype": quantized,
        "dataset": dataset_samples(spec.dataset) if quantized and spec.dataset else None,
        "quantized_algorithm": spec.quant_algorithm,
        "quantized_method": spec.quant_method,
        "hybrid": spec.hybrid if quantized else None,
        "float_layers": list(spec.float_layers),
        "layer_selection": LAYER_SELECTION.get(spec.hybrid or ""),
        "min_cosine": spec.min_cosine,
        "analyse": analyse,
        "optimization_level": spec.optimization_level,
        "dynamic_input": [[list(shape) for shape in group] for group in spec.dynamic_input],
        "export": BLOB_NAME if export else None,
        "runtime": runtime,
    }
