"""A pool of contexts for one compiled model: up to one per NPU core, opened only when calls
overlap, each used by one thread at a time, within a memory budget.

The pool is a :class:`~rkort.backends.base.Runner` itself: ``run()`` borrows a free context (the
first one opened, when calls do not overlap), opens another when every open one is busy and the
pool may grow, or waits for one to be free. A context that fails to open stops the growth; the
open ones serve on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np

from .base import Runner, RunnerClosed

log = logging.getLogger("rkort")


class Budget:
    """Bytes of NPU memory the contexts of one session may hold (None: no limit)."""

    def __init__(self, limit: Optional[int]) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int, *, force: bool = False) -> bool:
        """Reserve ``n`` bytes; False when that would exceed the limit (unless ``force``)."""
        with self._lock:
            if not force and self.limit is not None and self.used + n > self.limit:
                return False
            self.used += n
            return True

    @property
    def over(self) -> bool:
        """True when more is held than the limit allows."""
        return self.limit is not None and self.used > self.limit

    def give(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)


class ContextPool(Runner):
    """Contexts of one blob. ``open_context(slot)`` opens the context for slot 0, 1, ... (slot
    ``i`` is pinned to the ``i``-th core of the pool's mask); ``slots`` is how many may open,
    ``cost`` the bytes one context holds; ``on_call(label)`` is told which context ran a call.
    """

    def __init__(
        self,
        open_context: Callable[[int], Runner],
        slots: int,
        *,
        cost: int = 0,
        budget: Budget | None = None,
        labels: Sequence[str] = (),
        on_call: Callable[[str], None] | None = None,
    ) -> None:
        first = open_context(0)
        super().__init__(first.spec)
        self.name = first.name
        self._open_context = open_context
        self._slots = max(1, slots)
        self._cost = cost
        self._budget = budget
        self._labels = list(labels) or [f"context {i}" for i in range(self._slots)]
        self._on_call = on_call
        self._contexts: dict[int, Runner] = {0: first}
        self._idle: list[int] = [0]
        self._opening = 0
        self._next_slot = 1
        self._cond = threading.Condition()
        if budget is not None:
            budget.take(cost, force=True)  # the first context is what makes the model run at all
        #: Calls served by each context, by label.
        self.calls: dict[str, int] = {}

    @property
    def contexts(self) -> int:
        """How many contexts are open."""
        return len(self._contexts)

    @property
    def runners(self) -> list[Runner]:
        return list(self._contexts.values())

    def run(
        self, inputs: Sequence[np.ndarray], output_shapes: Sequence[tuple[int, ...]] | None = None
    ) -> list[np.ndarray]:
        slot = self._borrow()
        try:
            outputs = self._contexts[slot].run(inputs, output_shapes)
        finally:
            self._return(slot)
        label = self._labels[slot] if slot < len(self._labels) else f"context {slot}"
        with self._cond:
            self.calls[label] = self.calls.get(label, 0) + 1
        if self._on_call is not None:
            self._on_call(label)
        return outputs

    def _run(self, inputs: list[np.ndarray]) -> Sequence[Any]:
        raise NotImplementedError  # run() is overridden: a pool has no context of its own

    def _borrow(self) -> int:
        with self._cond:
            while True:
                if self._closed:
                    raise RunnerClosed(f"the contexts of {self.spec.model_name} are closed")
                if self._idle:
                    return self._idle.pop()
                grow = len(self._contexts) + self._opening < self._slots
                if grow and (self._budget is None or self._budget.take(self._cost)):
                    self._opening += 1
                    slot, self._next_slot = self._next_slot, self._next_slot + 1
                    break
                self._cond.wait()
        try:
            context = self._open_context(slot)
        except Exception as e:  # noqa: BLE001 - the open contexts keep serving
            log.warning(
                "could not open another context for %s (%s); %d keep serving",
                self.spec.model_name,
                e,
                len(self._contexts),
            )
            with self._cond:
                self._opening -= 1
                self._slots = len(self._contexts) + self._opening
                if self._budget is not None:
                    self._budget.give(self._cost)
                self._cond.notify_all()
            return self._borrow()
        with self._cond:
            self._opening -= 1
            if self._closed:
                context.close()
                raise RunnerClosed(f"the contexts of {self.spec.model_name} are closed")
            self._contexts[slot] = context
            log.info(
                "%s: calls overlap, context %d of %d opened",
                self.spec.model_name,
                len(self._contexts),
                self._slots,
            )
        return slot

    def _return(self, slot: int) -> None:
        with self._cond:
            self._idle.append(slot)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            contexts, self._contexts = list(self._contexts.values()), {}
            self._idle = []
            self._cond.notify_all()
        if self._budget is not None:
            self._budget.give(self._cost * len(contexts))
        for context in contexts:
            context.close()

    def _release(self) -> None:
        pass
