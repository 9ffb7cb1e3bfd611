"""When a trial build of an NPU segment fails: which node to blame (the one the converter's message
names, else the one a bisection of the segment finds), so the plan can put it on the CPU."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence

import onnx

from .graph import node_reads
from .rules import NPU
from .segments import Segment
from .spec import BuildFailed, CompileError, ConverterCrashed

log = logging.getLogger("rkort")

_NAMED = re.compile(r"(\w+)\('([^']+)'\)")


def rejects_graph(error: BaseException) -> bool:
    """A refusal or an abort of the converter on this graph; not a process killed from outside
    (SIGKILL: out of memory) or a missing toolkit."""
    if isinstance(error, BuildFailed):
        return True
    return isinstance(error, ConverterCrashed) and "SIGKILL" not in str(error)


class Blame:
    """Finds the nodes of a refused segment to move to the CPU.

    ``prefix_fails(segment)`` builds a sub-segment and says whether the converter refuses it; it
    is called at most while ``budget()`` is true (bisection stops when the trial builds run out),
    and only for segments of at most ``bisect_limit`` nodes.
    """

    def __init__(
        self,
        graph_nodes: Mapping[str, onnx.NodeProto],
        order: Sequence[str],
        graph_outputs: Sequence[str],
        initializers: set[str],
        prefix_fails: Callable[[Segment], bool],
        budget: Callable[[], bool],
        bisect_limit: int = 128,
    ) -> None:
        self._index = graph_nodes
        self._order = list(order)
        self._outputs = set(graph_outputs)
        self._initializers = initializers
        self._prefix_fails = prefix_fails
        self._budget = budget
        self._bisect_limit = bisect_limit

    def __call__(self, seg: Segment, error: CompileError, constant: set[str]) -> dict[str, str]:
        """Node -> the reason it goes to the CPU (every node of ``seg`` when none can be singled
        out)."""
        work = [n for n in seg.nodes if n not in constant]
        message = _short(error)
        named = _named_nodes(error, work, self._index)
        if named:
            log.info("NPU build of segment %d failed at %s; those go to the CPU", seg.index, named)
            return {n: f"a trial build rejects it: {message}" for n in named}
        culprit = None
        if 1 < len(work) <= self._bisect_limit:
            culprit = self._bisect(work, constant)
        if culprit is None and len(work) == 1:
            culprit = work[0]
        if culprit is not None:
            log.info(
                "NPU build of segment %d failed; bisection blames %s, which goes to the CPU",
                seg.index,
                culprit,
            )
            return {culprit: f"a trial build rejects it: {message}"}
        log.info("NPU build of segment %d failed; its %d nodes go to the CPU", seg.index, len(work))
        return {n: f"a trial build rejects its segment: {message}" for n in work}

    def _bisect(self, work: list[str], constant: set[str]) -> str | None:
        """The first node whose prefix of the segment fails to build (the whole segment fails)."""
        lo, hi = 0, len(work) - 1
        while lo < hi:
            if not self._budget():
                return None
            mid = (lo + hi) // 2
            if self._prefix_fails(self.sub_segment(work[: mid + 1], constant)):
                hi = mid
            else:
                lo = mid + 1
        return work[hi]

    def sub_segment(self, names: list[str], constant: set[str]) -> Segment:
        """The segment of ``names`` (with the constants they read), reading what it does not
        make and giving out what the rest of the graph reads."""
        producer = {o: n for n, node in self._index.items() for o in node.output if o}
        own = set(names)
        stack = [producer[r] for n in names for r in node_reads(self._index[n]) if r in producer]
        while stack:
            p = stack.pop()
            if p in constant and p not in own:
                own.add(p)
                stack.extend(producer[r] for r in node_reads(self._index[p]) if r in producer)
        ordered = [n for n in self._order if n in own]
        made = {o for n in ordered for o in self._index[n].output if o}
        inputs: list[str] = []
        for n in ordered:
            for r in node_reads(self._index[n]):
                if r not in made and r not in self._initializers and r not in inputs:
                    inputs.append(r)
        read_elsewhere = {
            r for n, node in self._index.items() if n not in own for r in node_reads(node)
        } | self._outputs
        outputs = [o for n in names for o in self._index[n].output if o and o in read_elsewhere]
        if not outputs:
            outputs = [o for o in self._index[names[-1]].output if o]
        return Segment(-1, NPU, tuple(ordered), tuple(inputs), tuple(outputs))


def _named_nodes(
    error: CompileError, candidates: Sequence[str], index: Mapping[str, onnx.NodeProto]
) -> list[str]:
    """Nodes of ``candidates`` the toolkit's message names as ``OpType('name')`` (by node name or
    output name; the toolkit suffixes rewritten nodes with '#1')."""
    text = " ".join([str(error), *error.toolkit_errors])
    found: list[str] = []
    for op, ref in _NAMED.findall(text):
        ref = ref.split("#")[0]
        for name in candidates:
            node = index[name]
            if node.op_type == op and (name == ref or ref in node.output) and name not in found:
                found.append(name)
    return found


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."
