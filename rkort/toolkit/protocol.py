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


def build_request(
    spec: BuildSpec, *, export: bool, runtime: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The first message to a worker: what to build (paths made absolute) and what to do after.

    ``runtime`` None: build (and export) only. ``{"target": None}``: build, then start the
    simulator. ``{"blob": path, "target": t, "device_id": d}``: load a blob and run it on a board.
    """
    return {
        "model_path": os.path.abspath(spec.model_path),
        "input_names": list(spec.input_names),
        "input_shapes": [list(s) for s in spec.input_shapes],
        "output_names": list(spec.output_names),
        "output_shapes": [list(s) for s in spec.output_shapes],
        "target": spec.target,
        "float_dtype": spec.float_dtype,
        "quantized_dtype": spec.quantized_dtype,
        "dataset": dataset_samples(spec.dataset) if spec.quantized_dtype and spec.dataset else None,
        "optimization_level": spec.optimization_level,
        "dynamic_input": [[list(shape) for shape in group] for group in spec.dynamic_input],
        "export": BLOB_NAME if export else None,
        "runtime": runtime,
    }
