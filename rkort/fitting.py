"""Buckets fitted to recorded traffic: the at most K shapes that minimise padded compute, exactly.

Input: how often each size of the padded dims was seen (``{(batch, length): calls}``, or
``{(length,): calls}``); output: the shapes to compile. The cost of a call is the number of
elements of the shape it is padded to (batch x sequence tokens), which is what an encoder's
matmuls scale with; needed compute is the elements of the call's own sizes.

- **One varying dim** (batch 1, or a fixed batch): an optimal partition of the sorted distinct
  lengths, by dynamic programming (``O(K m^2)`` for ``m`` distinct lengths): the exact optimum
  over every set of at most K buckets.
- **Several varying dims** (batch and sequence): the exact optimum over the sets in which every
  batch bucket has sequence buckets of its own and a call takes the smallest batch bucket that
  holds it, then that batch bucket's smallest sequence bucket that holds it (a DP over contiguous
  groups of the distinct batch sizes, each group solved by the 1-D DP, K shared among the groups).
  That is a restriction: a session picks the cheapest signature that holds a call, possibly one
  of a larger batch with a shorter sequence, so its real cost is at most the fitted one (what
  :func:`padded_cost` measures), and the unrestricted optimum can be lower still.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

Sizes = tuple[int, ...]
#: Rows of the 1-D DP's cost matrix computed at once (bounds its memory to BLOCK x m floats).
_BLOCK = 256


@dataclass(frozen=True)
class Fit:
    """The fitted shapes (sizes of the padded dims, cheapest first) and what they cost."""

    shapes: list[Sizes]
    #: Elements computed when every call takes the cheapest fitted shape that holds it.
    cost: int
    #: Elements the calls need (their own sizes).
    needed: int
    #: True when ``shapes`` is the optimum over every set of at most K shapes (one varying dim,
    #: or no padding left); False when it is the optimum of the restricted family (several
    #: varying dims, see the module docstring).
    exact: bool

    @property
    def waste(self) -> float:
        """Elements computed / elements needed."""
        return self.cost / self.needed if self.needed else 1.0


def fit(counts: Mapping[Sizes, int], max_shapes: int) -> Fit:
    """The at most ``max_shapes`` shapes minimising padded elements over ``counts`` (sizes of the
    padded dims, outer dim first, e.g. (batch, length) -> calls). Every recorded size is held by
    some shape."""
    return fits(counts, max_shapes)[-1]


def fits(counts: Mapping[Sizes, int], max_shapes: int) -> list[Fit]:
    """:func:`fit` for at most 1, 2, ..., ``max_shapes`` shapes (one DP gives them all)."""
    if max_shapes < 1:
        raise ValueError("max_shapes must be at least 1")
    items = sorted((tuple(int(v) for v in s), int(n)) for s, n in counts.items() if n > 0)
    if not items:
        return [Fit([], 0, 0, True)] * max_shapes
    ndim = len(items[0][0])
    if any(len(s) != ndim or min(s, default=1) < 1 for s, _ in items):
        raise ValueError("every sample needs the same number of dims, each at least 1")
    solver = _Solver(tuple(items), max_shapes)
    table = solver.table(solver.root)
    varying = sum(len({s[d] for s, _ in items}) > 1 for d in range(ndim))
    needed = _needed(items)
    result: list[Fit] = []
    best = 0
    for k in range(1, max_shapes + 1):
        if k <= len(table) and table[k - 1][0] < table[best][0]:
            best = k - 1
        shapes = sorted(table[best][1], key=lambda s: (math.prod(s), s))
        cost = padded_cost(counts, shapes)
        result.append(Fit(shapes, cost, needed, varying <= 1 or cost == needed))
    return result


def padded_cost(counts: Mapping[Sizes, int], shapes: Sequence[Sizes]) -> int:
    """Elements computed when each call takes the cheapest shape that holds it (as a session
    does). Raises ValueError when a call fits none."""
    total = 0
    by_cost = sorted(shapes, key=math.prod)
    for sizes, n in counts.items():
        fitting = next(
            (s for s in by_cost if all(a >= b for a, b in zip(s, sizes))),
            None,
        )
        if fitting is None:
            raise ValueError(f"no shape holds {sizes}")
        total += n * math.prod(fitting)
    return total


def partition_1d(values: Sequence[int], counts: Sequence[int], k: int) -> tuple[int, list[int]]:
    """The optimal partition of sorted distinct ``values`` (seen ``counts`` times each) into at
    most ``k`` buckets: (total of count x bucket, the buckets)."""
    costs, back = _dp_1d(tuple(values), tuple(counts), k)
    best = int(np.argmin(costs))
    return int(costs[best]), _backtrack(values, back, best)


def _needed(items: Sequence[tuple[Sizes, int]]) -> int:
    return sum(n * math.prod(s) for s, n in items)


def _dp_1d(
    values: tuple[int, ...], counts: tuple[int, ...], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """costs[j] = the optimum with exactly j+1 buckets (j < min(k, m)); back[j][i] = the index of
    the previous bucket when value i is the last bucket of j+1 (-1: none)."""
    x = np.asarray(values, dtype=np.float64)
    m = len(x)
    if m == 0 or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError("values must be distinct, sorted and not empty")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(counts, dtype=np.float64))])
    k = min(k, m)
    f = x * prefix[1:]  # one bucket, the last at value i, holds values 0..i
    back = np.full((k, m), -1, dtype=np.int64)
    costs = [f[-1]]
    for level in range(1, k):
        new = np.full(m, np.inf)
        for start in range(level, m, _BLOCK):
            j = np.arange(start, min(start + _BLOCK, m))
            # previous bucket at i < j: f[i] + x[j] * (calls in values i+1..j)
            cand = f[None, :] + x[j, None] * (prefix[j + 1, None] - prefix[None, 1:])
            cand[np.arange(m)[None, :] >= j[:, None]] = np.inf
            arg = np.argmin(cand, axis=1)
            new[j] = cand[np.arange(len(j)), arg]
            back[level, j] = arg
        f = new
        costs.append(f[-1])
    return np.asarray(costs), back


def _backtrack(values: Sequence[int], back: np.ndarray, level: int) -> list[int]:
    chosen = []
    i = len(values) - 1
    while level >= 0 and i >= 0:
        chosen.append(int(values[i]))
        i = int(back[level, i])
        level -= 1
    return sorted(chosen)


class _Solver:
    """The DP over dims, outer first: per group of samples, the optimum for every K."""

    def __init__(self, items: tuple[tuple[Sizes, int], ...], k: int) -> None:
        self.root = items
        self.k = k
        self.table = lru_cache(maxsize=None)(self._table)

    def shapes(self, items: tuple[tuple[Sizes, int], ...], k: int) -> list[Sizes]:
        return self.table(items)[k - 1][1]

    def _table(self, items: tuple[tuple[Sizes, int], ...]) -> list[tuple[float, list[Sizes]]]:
        """Entry j-1: (the optimal cost with exactly j shapes, the shapes), for j = 1 up to K or
        as many as are useful; (inf, []) where j shapes cannot be used."""
        if len(items[0][0]) == 1:
            merged: dict[int, int] = {}
            for s, n in items:
                merged[s[0]] = merged.get(s[0], 0) + n
            values = tuple(sorted(merged))
            costs, back = _dp_1d(values, tuple(merged[v] for v in values), self.k)
            return [
                (float(costs[j]), [(b,) for b in _backtrack(values, back, j)])
                for j in range(len(costs))
            ]
        return self._outer(items)

    def _outer(self, items: tuple[tuple[Sizes, int], ...]) -> list[tuple[float, list[Sizes]]]:
        """Contiguous groups of the outer dim's distinct sizes, each padded to its largest size
        and given sequence (inner) shapes of its own; the K shared among the groups."""
        outer = sorted({s[0] for s, _ in items})
        inner: dict[int, list[tuple[Sizes, int]]] = {v: [] for v in outer}
        for s, n in items:
            inner[s[0]].append((s[1:], n))
        b = len(outer)
        # best[j][k]: (cost, choice) covering the outer sizes 0..j-1 with exactly k shapes
        best: list[dict[int, tuple[float, tuple[int, int]]]] = [{0: (0.0, (-1, 0))}]
        for j in range(1, b + 1):
            here: dict[int, tuple[float, tuple[int, int]]] = {}
            for a in range(j):
                group = tuple(sorted(x for v in outer[a:j] for x in inner[v]))
                sub = self.table(group)
                for used, (before, _) in best[a].items():
                    for kk in range(1, min(len(sub), self.k - used) + 1):
                        cost = before + outer[j - 1] * sub[kk - 1][0]
                        total = used + kk
                        if total not in here or cost < here[total][0]:
                            here[total] = (cost, (a, kk))
            best.append(here)
        result: list[tuple[float, list[Sizes]]] = []
        for total in range(1, max(best[b]) + 1):
            if total not in best[b]:
                result.append((math.inf, []))
                continue
            shapes: list[Sizes] = []
            j, k = b, total
            while j > 0:
                a, kk = best[j][k][1]
                group = tuple(sorted(x for v in outer[a:j] for x in inner[v]))
                shapes += [(outer[j - 1], *s) for s in self.shapes(group, kk)]
                j, k = a, k - kk
            result.append((best[b][total][0], shapes))
        return result
