"""Dynamic shapes on a static-shape NPU: which dynamic dims are padded up to a bucket, which are
compiled exactly, and how a run's inputs are padded and its outputs sliced back.

Per dynamic dimension (named by its symbol in the model, e.g. ``batch_size``):

- *batch*: the symbol at axis 0 of an input. Rows are independent, so the batch is padded to a
  batch bucket (and a batch larger than the largest bucket runs in chunks). Only when every output
  carries the symbol: an output without it could mix rows.
- *sequence*: the symbol at axis 1 of an attention-mask input. Positions past the mask do not
  change the valid part of the result, so it is padded to a sequence bucket (ids with the pad id,
  the mask and token type ids with 0, or the user's pad values).
- *past* and *total*: a decoder's KV cache (:mod:`rkort.kvcache`): the past length is padded
  on the left to a sequence bucket, the new tokens (*sequence*, buckets 1 and the sequence
  buckets) on the right, and the mask and the present outputs along their sum (*total*) keep
  the real positions as one window.
- *exact*: anything else (image height and width, ...). Compiled for the observed size.

Outputs are sliced back along every axis whose symbol was padded; the symbols of output axes come
from the model's declared output shapes, else from ONNX shape inference, never from sizes. If an
output has a dynamic dim that cannot be traced to an input symbol, nothing is padded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .errors import InvalidArgument, ort_error
from .kvcache import KVLayout, find_layout, is_mask

log = logging.getLogger("rkort")

DEFAULT_SEQUENCE_BUCKETS = (16, 32, 64, 128, 256, 512)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8)
Dim = Any  # int (fixed), str (a symbol) or None (unnamed dynamic)


class Oversize(Exception):
    """An input is longer than the largest bucket (the message names input, length and limit)."""


class NotWarmed(Exception):
    """No signature the session may use fits these inputs (on a machine without the converter:
    none of the shapes warmed into the cache). ``wanted`` is the signature the configured buckets
    would give them (None when they are beyond those too)."""

    def __init__(self, wanted: tuple[tuple[int, ...], ...] | None) -> None:
        super().__init__("no warmed shape fits these inputs")
        self.wanted = wanted


@dataclass(frozen=True)
class RunPlan:
    """How one run() maps onto compiled shapes: the static signature to run, the batch chunks,
    and the actual size of every padded symbol."""

    signature: tuple[tuple[int, ...], ...]
    chunks: tuple[slice, ...]
    actual: Mapping[str, int]


class ShapePolicy:
    """The shape rules of one model (see the module docstring). ``model`` has a ``proto``
    attribute (read only for models with dynamic inputs)."""

    def __init__(
        self,
        model: Any,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        *,
        sequence_buckets: Sequence[int] | None = None,
        batch_buckets: Sequence[int] | None = None,
        pad_values: Mapping[str, float] | None = None,
        exact_dims: Sequence[str] = (),
    ) -> None:
        self.input_names = [i.name for i in inputs]
        self.input_dims = named_dims(inputs)
        self.static = all(isinstance(d, int) for dims in self.input_dims for d in dims)
        self.output_dims: list[list[Dim]] = [list(o.shape) for o in outputs]
        self.kind: dict[str, str] = {}
        self.buckets: dict[str, tuple[int, ...]] = {}
        #: When set (:meth:`restrict`), the signatures to use, cheapest first.
        self.allowed: list[tuple[tuple[int, ...], ...]] | None = None
        #: Why each dynamic dim is padded or compiled exactly (shown by `rkort inspect`).
        self.reasons: dict[str, str] = {}
        #: The pad values the user gave (the padding proof chooses the others).
        self.given_pad_values: dict[str, float] = dict(pad_values or {})
        self._fallback = False
        #: A decoder's KV cache, when the model has one.
        self.kv: KVLayout | None = None
        if self.static:
            self.pad_values: list[float] = [0.0] * len(inputs)
            return
        symbols = [d for dims in self.input_dims for d in dims if isinstance(d, str)]
        batch = {dims[0] for dims in self.input_dims if dims and isinstance(dims[0], str)}
        sequence = {
            dims[1]
            for name, dims in zip(self.input_names, self.input_dims)
            if len(dims) == 2 and isinstance(dims[1], str) and is_mask(name)
        }
        traceable = all(
            isinstance(d, int) or d in symbols for dims in self.output_dims for d in dims
        )
        if not traceable:
            log.info(
                "outputs %s have dims not traced to an input; no dim is padded (shapes compile exactly)",
                self.output_dims,
            )
        # Outputs of a fixed shape (a merged decoder's placeholder outputs) follow no batch.
        varying = [ds for ds in self.output_dims if not all(isinstance(d, int) for d in ds)]
        for s in dict.fromkeys(symbols):
            if not traceable:
                self.kind[s] = "exact"
                self.reasons[s] = "an output has a dim not traced to an input, so none is padded"
            elif s in exact_dims:
                self.kind[s] = "exact"
                self.reasons[s] = "the exact_dims option names it"
            elif s in batch and s not in sequence and all(s in dims for dims in varying):
                self.kind[s] = "batch"
            elif s in sequence:
                self.kind[s] = "sequence"
            else:
                self.kind[s] = "exact"
                self.reasons[s] = (
                    "neither a batch (axis 0 of every output) nor a masked sequence (axis 1 of "
                    "an attention mask)"
                )
        kv = find_layout(self.input_names, self.input_dims) if traceable else None
        if kv is not None and not {kv.past, kv.sequence, kv.total} & set(exact_dims):
            self.kv = kv
            for symbol, kind in ((kv.past, "past"), (kv.sequence, "sequence"), (kv.total, "total")):
                self.kind[symbol] = kind
                self.reasons.pop(symbol, None)
            self.reasons[kv.total] = (
                "past + new tokens: the mask and the present outputs keep the real positions "
                "as one window (the past padded on the left)"
            )
        bat = tuple(sorted(set(batch_buckets or DEFAULT_BATCH_BUCKETS)))
        seq = tuple(sorted(set(sequence_buckets or ())))
        # Read from the model's position table only when asked for: a board uses the warmed
        # shapes and never needs the graph. A decoder's past always has these: ``buckets`` are
        # its prompt lengths.
        self.buckets = _DefaultSequenceBuckets(
            model,
            [s for s, k in self.kind.items() if k == "past" or (k == "sequence" and not seq)],
            {self.kv.sequence} if self.kv else set(),
        )
        for s, k in self.kind.items():
            if k == "sequence" and seq:
                self.buckets[s] = (
                    tuple(sorted({1, *seq})) if self.kv and s == self.kv.sequence else seq
                )
            elif k == "batch":
                self.buckets[s] = bat
        given = dict(pad_values or {})
        unknown = set(given) - set(self.input_names)
        if unknown:
            raise ort_error(
                InvalidArgument,
                f"pad_values names {sorted(unknown)}, which are not inputs {self.input_names}",
            )
        self.pad_values = [given.get(n, 0.0) for n in self.input_names]

    def compile_exactly(self, symbol: str, reason: str) -> None:
        """Compile ``symbol`` per observed size instead of padding it (padding is not safe)."""
        self.kind[symbol] = "exact"
        self.reasons[symbol] = reason
        self.buckets.pop(symbol, None)

    def input_symbols(self) -> list[str]:
        """Every dynamic dim's symbol, in input order."""
        return list(
            dict.fromkeys(d for dims in self.input_dims for d in dims if isinstance(d, str))
        )

    def signature_for(self, sizes: Mapping[str, int]) -> tuple[tuple[int, ...], ...]:
        """The input shapes with every symbol at its size in ``sizes``."""
        return self._signature(sizes)

    def pad_to(
        self, arrays: Sequence[np.ndarray], signature: tuple[tuple[int, ...], ...]
    ) -> list[np.ndarray]:
        """Inputs padded (with the pad values) to ``signature``."""
        return self.pad(arrays, RunPlan(signature, (slice(None),), {}), slice(None))

    @property
    def padded_symbols(self) -> list[str]:
        return [s for s, k in self.kind.items() if k in ("batch", "sequence", "past")]

    @property
    def exact(self) -> bool:
        """True when some dim is compiled per observed size (no bucket list covers it)."""
        return any(k == "exact" for k in self.kind.values())

    def signatures(self) -> list[tuple[tuple[int, ...], ...]]:
        """Every bucket signature (for warm-up and multi-shape blobs); empty if a dim is exact."""
        if self.static:
            return [tuple(tuple(d) for d in self.input_dims)]  # type: ignore[arg-type]
        if self.exact:
            return []
        symbols = self.padded_symbols
        combos: list[dict[str, int]] = [{}]
        for s in symbols:
            combos = [{**c, s: b} for c in combos for b in self.buckets[s]]
        return [self._signature(c) for c in combos]

    def _signature(self, sizes: Mapping[str, int]) -> tuple[tuple[int, ...], ...]:
        if self.kv is not None:
            sizes = {**sizes, self.kv.total: self.kv.derived(sizes)}
        return tuple(
            tuple(d if isinstance(d, int) else sizes[d] for d in dims) for dims in self.input_dims
        )

    def restrict(
        self, signatures: Sequence[tuple[tuple[int, ...], ...]], fallback: bool = False
    ) -> None:
        """Use these signatures (the shapes warmed into the cache, or fitted to recorded
        traffic): an input goes to the cheapest one it fits. When none does, :meth:`plan` raises
        :class:`NotWarmed`, or with ``fallback`` uses the configured buckets."""
        self.allowed = sorted(set(signatures), key=_elements)
        self._fallback = fallback

    def plan(self, arrays: Sequence[np.ndarray]) -> RunPlan | None:
        """The plan for these (validated) inputs; None when onnxruntime should run them (an
        empty dim, or sizes that disagree for one symbol)."""
        if self.allowed is not None:
            return self._plan_allowed(arrays)
        return self._plan(arrays)

    def _plan_allowed(self, arrays: Sequence[np.ndarray]) -> RunPlan | None:
        actual = self._actual(arrays)
        if actual is None or self._empty(actual):
            return None
        assert self.allowed is not None
        batch = self.batch_symbol()
        fitting = [s for s in self.allowed if self._fits(s, actual, None)]
        if fitting:
            return RunPlan(fitting[0], (slice(None),), actual)
        if batch is not None:
            # A batch larger than every warmed batch runs in chunks of the largest that fits.
            others = [s for s in self.allowed if self._fits(s, actual, batch)]
            if others:
                size = max(self.size_of(s, batch) for s in others)
                best = next(s for s in others if self.size_of(s, batch) == size)
                n = actual[batch]
                chunks = tuple(slice(i, min(i + size, n)) for i in range(0, n, size))
                return RunPlan(best, chunks, actual)
        if self._fallback:
            return self._plan(arrays)
        try:
            wanted = self._plan(arrays)
        except Oversize:
            wanted = None
        raise NotWarmed(wanted.signature if wanted is not None else None)

    def _fits(
        self, signature: tuple[tuple[int, ...], ...], actual: Mapping[str, int], skip: str | None
    ) -> bool:
        for dims, shape in zip(self.input_dims, signature):
            if len(dims) != len(shape):
                return False
            for d, size in zip(dims, shape):
                if isinstance(d, int):
                    if d != size:
                        return False
                elif d == skip or self.kind.get(d) == "total":
                    continue
                elif self.kind.get(d, "exact") == "exact":
                    if size != actual[d]:
                        return False
                elif size < actual[d]:
                    return False
        return True

    def size_of(self, signature: tuple[tuple[int, ...], ...], symbol: str) -> int:
        for dims, shape in zip(self.input_dims, signature):
            if symbol in dims:
                return shape[dims.index(symbol)]
        return 0

    def _actual(self, arrays: Sequence[np.ndarray]) -> dict[str, int] | None:
        actual: dict[str, int] = {}
        for dims, a in zip(self.input_dims, arrays):
            for axis, d in enumerate(dims):
                if isinstance(d, str):
                    if actual.setdefault(d, a.shape[axis]) != a.shape[axis]:
                        return None
        return actual

    def _plan(self, arrays: Sequence[np.ndarray]) -> RunPlan | None:
        if self.static:
            return RunPlan(tuple(a.shape for a in arrays), (slice(None),), {})
        actual = self._actual(arrays)
        if actual is None or self._empty(actual):
            return None
        chunk = None
        sizes: dict[str, int] = {}
        for s, n in actual.items():
            kind = self.kind[s]
            if kind == "total":
                continue
            if kind == "exact":
                sizes[s] = n
                continue
            buckets = self.buckets[s]
            if kind == "batch" and n > buckets[-1]:
                chunk = (s, buckets[-1])
                sizes[s] = buckets[-1]
                continue
            fit = next((b for b in buckets if b >= n), None)
            if fit is None:
                name, axis = self._where(s)
                raise Oversize(
                    f"input '{name}' has {s}={n} at axis {axis}, more than the largest bucket "
                    f"({buckets[-1]}) of the RKNNExecutionProvider; set larger 'buckets' in its "
                    "provider options (or 'oversize': 'cpu' to run such inputs on the CPU)"
                )
            sizes[s] = fit
        chunks: tuple[slice, ...] = (slice(None),)
        if chunk is not None:
            s, size = chunk
            chunks = tuple(slice(i, min(i + size, actual[s])) for i in range(0, actual[s], size))
        return RunPlan(self._signature(sizes), chunks, actual)

    def _empty(self, actual: Mapping[str, int]) -> bool:
        """An empty dim (onnxruntime answers); a decoder's empty past is padded like any."""
        return any(v == 0 for s, v in actual.items() if self.kind.get(s) != "past")

    def _where(self, symbol: str) -> tuple[str, int]:
        for name, dims in zip(self.input_names, self.input_dims):
            if symbol in dims:
                return name, dims.index(symbol)
        return "?", -1

    def batch_symbol(self) -> str | None:
        return next((s for s, k in self.kind.items() if k == "batch"), None)

    def pad(self, arrays: Sequence[np.ndarray], plan: RunPlan, chunk: slice) -> list[np.ndarray]:
        """Inputs cut to one batch chunk and padded to the plan's signature."""
        batch = self.batch_symbol()
        kv, pad_past = self.kv, 0
        if kv is not None:
            actual = plan.actual or self._actual(arrays) or {}
            pad_past = self.size_of(plan.signature, kv.past) - actual.get(kv.past, 0)
        out = []
        for a, dims, target, value in zip(arrays, self.input_dims, plan.signature, self.pad_values):
            if batch is not None and chunk != slice(None) and batch in dims:
                index = [slice(None)] * a.ndim
                index[dims.index(batch)] = chunk
                a = a[tuple(index)]
            if kv is None:
                widths = [(0, t - n) for n, t in zip(a.shape, target)]
            else:
                widths = [kv.widths(d, n, t, pad_past) for d, n, t in zip(dims, a.shape, target)]
            if any(before or after for before, after in widths):
                a = np.pad(
                    a, widths, mode="constant", constant_values=np.asarray(value).astype(a.dtype)
                )
            out.append(a)
        return out

    def slice_outputs(
        self,
        outputs: Sequence[np.ndarray],
        sizes: Mapping[str, int],
        signature: tuple[tuple[int, ...], ...] | None = None,
    ) -> list[np.ndarray]:
        """Outputs cut back along every padded symbol to the sizes in ``sizes`` (a decoder's
        total to its real window in the padded ``signature``)."""
        window = None
        if self.kv is not None and signature is not None and self.kv.past in sizes:
            window = self.kv.window(self.size_of(signature, self.kv.past), sizes)
        result = []
        for o, dims in zip(outputs, self.output_dims):
            index = tuple(
                window
                if window is not None and d == self.kv.total  # type: ignore[union-attr]
                else slice(0, sizes[d])
                if isinstance(d, str) and d in sizes
                else slice(None)
                for d in dims
            )
            result.append(
                np.ascontiguousarray(o[index])
                if index and any(s != slice(None) for s in index)
                else o
            )
        return result

    def chunk_sizes(self, plan: RunPlan, chunk: slice) -> dict[str, int]:
        """The actual size of each padded symbol within one chunk."""
        batch = self.batch_symbol()
        sizes = {
            s: v
            for s, v in plan.actual.items()
            if self.kind.get(s) != "exact" or (self.kv and s in (self.kv.past, self.kv.sequence))
        }
        if batch is not None and chunk != slice(None):
            sizes[batch] = chunk.stop - chunk.start
        return sizes

    def concat(self, parts: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Outputs of several batch chunks joined along each output's batch axis."""
        if len(parts) == 1:
            return parts[0]
        batch = self.batch_symbol()
        joined = []
        for k, dims in enumerate(self.output_dims):
            axis = dims.index(batch)
            joined.append(np.concatenate([p[k] for p in parts], axis=axis))
        return joined


class _DefaultSequenceBuckets(dict):  # type: ignore[type-arg]
    """Buckets by symbol; a sequence symbol's default buckets are read from the model on first
    use."""

    def __init__(
        self, model: Any, sequence_symbols: Sequence[str], from_one: set[str] | None = None
    ) -> None:
        super().__init__()
        self._model = model
        self._sequence = set(sequence_symbols)
        self._from_one = from_one or set()

    def __missing__(self, symbol: str) -> tuple[int, ...]:
        if symbol not in self._sequence:
            raise KeyError(symbol)
        value = _default_sequence_buckets(self._model.proto)
        if symbol in self._from_one:
            value = (1, *value)  # a decoder's new tokens: one per step after the prompt
        self[symbol] = value
        return value


def named_dims(inputs: Sequence[Any]) -> list[list[Dim]]:
    """The inputs' dims, an unnamed dynamic dim named after its input and axis."""
    return [[_dim(d, f"{i.name}:{a}") for a, d in enumerate(i.shape)] for i in inputs]


def _dim(d: Any, unnamed: str) -> Dim:
    """A declared dim: its size, its symbol, or ``unnamed`` for a dynamic dim without a name
    (None, a negative size, or "?", which paddle2onnx gives every free dim)."""
    if isinstance(d, int) and d >= 0:
        return d
    return d if isinstance(d, str) and d not in ("", "?") else unnamed


def _default_sequence_buckets(model: onnx.ModelProto) -> tuple[int, ...]:
    """Powers of two from 16 up to the model's maximum length (its position-embedding table)."""
    limit = _max_positions(model) or DEFAULT_SEQUENCE_BUCKETS[-1]
    buckets = [b for b in DEFAULT_SEQUENCE_BUCKETS if b <= limit] or [limit]
    if limit < DEFAULT_SEQUENCE_BUCKETS[-1] and limit - buckets[-1] > 2:
        buckets.append(limit)
    return tuple(buckets)


def _max_positions(model: onnx.ModelProto) -> int | None:
    for t in model.graph.initializer:
        if "position_embedding" in t.name.lower() and len(t.dims) == 2:
            return int(t.dims[0])
    return None


def _elements(signature: tuple[tuple[int, ...], ...]) -> int:
    return sum(math.prod(shape) for shape in signature)


def waste(lengths: Sequence[int], buckets: Sequence[int]) -> float:
    """Tokens computed / tokens needed when each length is padded to its bucket."""
    needed = sum(lengths)
    computed = sum(next((b for b in sorted(buckets) if b >= n), math.inf) for n in lengths)
    return float(computed / needed) if needed else 1.0
