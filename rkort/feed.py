"""Turning a run() feed into arrays for a compiled graph, the way onnxruntime accepts it.

The fast path accepts exactly what onnxruntime accepts without complaint: known names, numpy
arrays (or lists, converted to the declared dtype as onnxruntime does) of the declared dtype,
rank and fixed dimensions. Anything else returns ``None`` and the session lets onnxruntime's own
CPU session raise its own error for the same mistake, so types and messages are onnxruntime's by
construction rather than by imitation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# onnxruntime's NodeArg.type strings for tensors, and the numpy dtypes they take.
TENSOR_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}


def dtype_of(type_string: str) -> np.dtype | None:
    """The numpy dtype of an onnxruntime tensor type string, None for strings, sequences, maps."""
    return TENSOR_DTYPES.get(type_string)


def prepare(
    feed: Mapping[Any, Any],
    input_names: Sequence[str],
    input_dtypes: Sequence[np.dtype],
    input_shapes: Sequence[Sequence[Any]],
) -> list[np.ndarray] | None:
    """Arrays in model input order, or None when onnxruntime would reject (or specially treat) the feed.

    ``input_shapes`` are the model's declared shapes: ints are checked, names and None are free.
    """
    if len(feed) != len(input_names):
        return None
    out: list[np.ndarray] = []
    for name, dtype, shape in zip(input_names, input_dtypes, input_shapes):
        try:
            value = feed[name]
        except (KeyError, TypeError):
            return None
        if type(value) is np.ndarray:
            if value.dtype != dtype:
                return None
        elif isinstance(value, list):
            try:
                value = np.asarray(value, dtype=dtype)
            except (ValueError, TypeError, OverflowError):
                return None
            if value.dtype == object:
                return None
        else:
            return None
        if value.ndim != len(shape):
            return None
        for got, want in zip(value.shape, shape):
            if isinstance(want, int) and got != want:
                return None
        out.append(value)
    return out


def output_indices(
    output_names: Sequence[Any] | None, all_names: Sequence[str]
) -> list[int] | None:
    """Positions of the requested outputs (all when None/empty), or None if a name is unknown or
    the names do not come as onnxruntime takes them (a list or tuple of str)."""
    if not output_names:
        return list(range(len(all_names)))
    # A str, a set, a generator... are refused by onnxruntime's binding (TypeError): let it say so.
    if not isinstance(output_names, (list, tuple)) or not all(
        isinstance(n, str) for n in output_names
    ):
        return None
    index = {n: i for i, n in enumerate(all_names)}
    try:
        return [index[n] for n in output_names]
    except (KeyError, TypeError):
        return None


def cast_output(out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """An NPU output (float32 from the runtime) in the dtype the model declares."""
    if out.dtype == dtype or dtype == np.dtype(object):
        return out
    if dtype.kind == "b":
        return out != 0
    if dtype.kind in "iu":
        return np.rint(out).astype(dtype)
    return out.astype(dtype)


def contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` in C order, shape kept (numpy's ascontiguousarray turns a 0-d array into 1-d)."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(a.shape)
