"""Cutting a placed graph into segments: runs of consecutive nodes of one device, each compiled
into one blob (NPU) or run as one onnxruntime session (CPU)."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx

from .graph import NONDETERMINISTIC, node_names, node_reads, subgraph_reads
from .rules import CPU, NPU, NodePlacement


@dataclass(frozen=True)
class Segment:
    """Consecutive nodes of one device, run as one unit (a blob, or an onnxruntime session).

    ``inputs`` are the tensors it reads from graph inputs or earlier segments, ``outputs`` the
    tensors later segments or the caller need. Constant-only nodes it reads are listed in
    ``nodes`` too (copied into each segment that uses them).
    """

    index: int
    device: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def plan_segments(model: onnx.ModelProto, placements: Sequence[NodePlacement]) -> list[Segment]:
    """Cut the graph into segments of consecutive same-device nodes.

    The order is topological and chosen greedily to make few segments: run every node of the
    current device that is ready before switching. Constant-only NPU nodes are not scheduled but
    copied into each segment that reads them; nodes no graph output depends on are left out.
    Segment inputs and outputs are exactly the values that cross a boundary, plus the graph's
    inputs and outputs.
    """
    graph = model.graph
    names = node_names(graph)
    by_name = {p.node_name: p for p in placements}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"no placement for nodes {missing[:5]}")
    device = [by_name[n].device for n in names]
    reads = [node_reads(n) for n in graph.node]
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for o in node.output:
            if o:
                producer[o] = i
    floating = _constant_nodes(graph, device, reads)
    live = _live_nodes(graph, reads, producer)
    scheduled = [i for i in range(len(graph.node)) if i not in floating and i in live]
    deps: dict[int, set[int]] = {
        i: {producer[r] for r in reads[i] if r in producer and producer[r] not in floating}
        for i in scheduled
    }
    best: list[list[int]] | None = None
    for start in (NPU, CPU):
        groups = _schedule(scheduled, deps, device, start)
        if best is None or len(groups) < len(best):
            best = groups
    groups = best or []
    if not groups and floating:
        # A graph of constants only: one segment holding them all.
        groups = [sorted(floating)]
        floating = set()
    return _describe_segments(graph, names, device, reads, producer, floating, groups)


def _live_nodes(
    graph: onnx.GraphProto, reads: list[list[str]], producer: Mapping[str, int]
) -> set[int]:
    """Nodes a graph output depends on (the rest computes nothing anyone reads)."""
    live: set[int] = set()
    stack = [producer[o.name] for o in graph.output if o.name in producer]
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        stack.extend(producer[r] for r in reads[i] if r in producer)
    return live


def _constant_nodes(graph: onnx.GraphProto, device: list[str], reads: list[list[str]]) -> set[int]:
    """NPU nodes computing only from initializers and other such nodes (never a graph output)."""
    static = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    outputs = {o.name for o in graph.output}
    found: set[int] = set()
    for i, node in enumerate(graph.node):
        if (
            device[i] == NPU
            and node.op_type not in NONDETERMINISTIC
            and not subgraph_reads(node)
            and all(r in static for r in reads[i])
            and not outputs.intersection(node.output)
        ):
            found.add(i)
            static.update(o for o in node.output if o)
    return found


def _schedule(
    nodes: list[int], deps: Mapping[int, set[int]], device: list[str], start: str
) -> list[list[int]]:
    users: dict[int, list[int]] = {i: [] for i in nodes}
    pending = {i: len(deps[i]) for i in nodes}
    for i in nodes:
        for d in deps[i]:
            users[d].append(i)
    ready: dict[str, list[int]] = {NPU: [], CPU: []}
    for i in nodes:
        if not pending[i]:
            heapq.heappush(ready[device[i]], i)
    groups: list[list[int]] = []
    current: list[int] = []
    cur = start
    while ready[NPU] or ready[CPU]:
        if not ready[cur]:
            if current:
                groups.append(current)
                current = []
            cur = CPU if cur == NPU else NPU
        i = heapq.heappop(ready[cur])
        current.append(i)
        for u in users[i]:
            pending[u] -= 1
            if not pending[u]:
                heapq.heappush(ready[device[u]], u)
    if current:
        groups.append(current)
    return groups


def _describe_segments(
    graph: onnx.GraphProto,
    names: list[str],
    device: list[str],
    reads: list[list[str]],
    producer: Mapping[str, int],
    floating: set[int],
    groups: list[list[int]],
) -> list[Segment]:
    graph_inputs = [i.name for i in graph.input]
    graph_outputs = [o.name for o in graph.output]
    initializers = {t.name for t in graph.initializer} | {
        t.values.name for t in graph.sparse_initializer
    }
    members: list[list[int]] = []
    for group in groups:
        own = set(group)
        stack = [producer[r] for i in group for r in reads[i] if r in producer]
        while stack:
            j = stack.pop()
            if j in floating and j not in own:
                own.add(j)
                stack.extend(producer[r] for r in reads[j] if r in producer)
        members.append(sorted(own))
    # Who reads each value, by segment.
    readers: dict[str, set[int]] = {}
    for s, nodes in enumerate(members):
        for i in nodes:
            for r in reads[i]:
                readers.setdefault(r, set()).add(s)
    segments = []
    for s, nodes in enumerate(members):
        made = {o for i in nodes for o in graph.node[i].output if o}
        needed: list[str] = []
        for i in nodes:
            for r in reads[i]:
                if r not in made and r not in initializers and r not in needed:
                    needed.append(r)
        inputs = [n for n in graph_inputs if n in needed] + [
            n for n in needed if n not in graph_inputs
        ]
        produced = [o for i in nodes if i not in floating for o in graph.node[i].output if o]
        outs = [n for n in graph_outputs if n in produced]
        outs += [o for o in produced if o not in outs and any(t != s for t in readers.get(o, ()))]
        segments.append(
            Segment(
                index=s,
                device=device[groups[s][0]],
                nodes=tuple(names[i] for i in nodes),
                inputs=tuple(inputs),
                outputs=tuple(outs),
            )
        )
    return segments
