"""The KV cache of a decoder on a static-shape NPU, and which inputs are attention masks: which
dims of a model are its past length, its new tokens and their sum, and where padding goes so
that a decode step is one call of a bounded number of compiled shapes.

optimum exports a decoder with a KV cache (``ORTModelForCausalLM``) with inputs
``past_key_values.N.key`` ``[batch, heads, past_sequence_length, head_dim]``, ``input_ids``
``[batch, sequence_length]`` and ``attention_mask`` ``[batch, past_sequence_length +
sequence_length]``, and outputs ``present.N.key`` along the sum. The past is padded on the *left*
(zeros, masked out), the new tokens on the right (masked out, and unseen by the real tokens of a
causal model), so along the sum the real positions are one window::

    mask    0 ... 0 | 1 (past) ... 1 | 1 (new) ... 1 | 0 ... 0
            P_b - P         P                S          S_b - S

and ``present`` is that window of the padded result. Whether this is harmless for a given model
is proven like every other padded dim (:mod:`rkort.padding`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KVLayout:
    """The symbols of a decoder's KV cache."""

    past: str  # the past length (axis -2 of every past key/value)
    sequence: str  # the new tokens
    total: str  # their sum, as the model names it (the mask and the present outputs)

    def derived(self, sizes: Mapping[str, int]) -> int:
        """The total for these sizes of past and new tokens."""
        return sizes[self.past] + sizes[self.sequence]

    def window(self, padded_past: int, sizes: Mapping[str, int]) -> slice:
        """The real positions along the total of a result padded to ``padded_past``."""
        start = padded_past - sizes[self.past]
        return slice(start, start + sizes[self.past] + sizes[self.sequence])

    def widths(self, symbol: Any, size: int, target: int, pad_past: int) -> tuple[int, int]:
        """(before, after) padding of one axis of ``symbol`` from ``size`` to ``target``;
        ``pad_past`` is how many positions the past is padded by."""
        if symbol == self.past:
            return (target - size, 0)
        if symbol == self.total:
            return (pad_past, target - size - pad_past)
        return (0, target - size)


_MASK_NAMES = ("attention_mask", "input_mask", "mask")


def is_mask(name: str) -> bool:
    """True for an input named as an attention mask."""
    low = name.lower()
    return any(m == low or low.endswith(m) for m in _MASK_NAMES)


def find_layout(names: Sequence[str], dims: Sequence[Sequence[Any]]) -> KVLayout | None:
    """The KV layout of a model's inputs, or None: a past length at axis -2 of inputs named
    ``past*``, and a mask whose length is named "<past> + <new tokens>"."""
    symbols = {d for ds in dims for d in ds if isinstance(d, str)}
    pasts = {
        ds[-2]
        for name, ds in zip(names, dims)
        if name.lower().startswith("past") and len(ds) >= 3 and isinstance(ds[-2], str)
    }
    for name, ds in zip(names, dims):
        if not (is_mask(name) and len(ds) == 2 and isinstance(ds[1], str)):
            continue
        parts = [p.strip() for p in ds[1].split("+")]
        if len(parts) == 2 and parts[0] in pasts and parts[1] in symbols:
            return KVLayout(parts[0], parts[1], ds[1])
    return None
