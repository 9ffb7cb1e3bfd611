"""A model's plan for one input signature: where each node runs and why (:mod:`.rules`), the
segments that follow (:mod:`.segments`), light NPU islands between CPU parts moved to the CPU,
and the share of FLOPs and parameters on the NPU (:mod:`.cost`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import onnx

from .cost import estimate_flops, param_counts, si
from .graph import TensorType, node_names, node_reads, prepare
from .rules import CONSTANT_REASON, CPU, NPU, NodePlacement, constant_nodes, place
from .segments import Segment, plan_segments

__all__ = [
    "CONSTANT_REASON",
    "CPU",
    "LIGHT_SEGMENT_FLOPS",
    "NPU",
    "NodePlacement",
    "Plan",
    "Segment",
    "plan",
]

#: An NPU segment with fewer estimated FLOPs than this, in a model that has CPU segments anyway,
#: runs on the CPU: a round trip to the NPU (about 0.1-0.4 ms per call on boards and on the
#: simulator) costs more than computing it there, and it saves a compile.
LIGHT_SEGMENT_FLOPS = 1_000_000


@dataclass(frozen=True)
class Plan:
    """A model's placement and segments for one input signature, with the FLOP/parameter estimate.

    ``flops`` holds each node's estimated FLOPs (None where a shape is unknown); constant-only
    nodes count 0 (the converter folds them). ``params`` counts initializer elements per segment
    device: an initializer used by any NPU segment counts on the NPU.
    """

    placements: tuple[NodePlacement, ...]
    segments: tuple[Segment, ...]
    flops: Mapping[str, float | None]
    params_npu: int
    params_total: int
    notes: tuple[str, ...] = ()

    @property
    def flops_total(self) -> float:
        return float(sum(f for f in self.flops.values() if f))

    @property
    def flops_npu(self) -> float:
        device = {p.node_name: p.device for p in self.placements}
        return float(sum(f for n, f in self.flops.items() if f and device.get(n) == NPU))

    @property
    def npu_flop_share(self) -> float | None:
        total = self.flops_total
        return self.flops_npu / total if total else None

    @property
    def npu_param_share(self) -> float | None:
        return self.params_npu / self.params_total if self.params_total else None


def plan(
    model: onnx.ModelProto,
    target: str,
    force_cpu: Collection[str] = (),
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rejected: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
    prepared: tuple[onnx.ModelProto, Mapping[str, TensorType]] | None = None,
) -> Plan:
    """Place, cut into segments, keep light NPU islands on the CPU, and estimate the shares.

    The model is first :func:`~rkort.graph.prepare`d for ``input_shapes`` (Shape/Size of static
    tensors and small constant computations become Constant nodes; segments are cut from the
    prepared model), unless the caller gives it ``prepared`` already. Without ``input_shapes``
    the declared shapes are used (FLOPs of nodes with unknown dims are not estimated and such
    models keep every island on the NPU). Op types are reported as ``model`` has them.
    """
    op_types = dict(zip(node_names(model.graph), (n.op_type for n in model.graph.node)))
    model, types = prepared if prepared is not None else prepare(model, input_shapes)
    placements = [
        NodePlacement(p.node_name, op_types.get(p.node_name, p.op_type), p.device, p.reason)
        for p in place(
            model, target, force_cpu, input_shapes=input_shapes, rejected=rejected, types=types
        )
    ]
    flops = estimate_flops(model, types, placements)
    side = _cpu_side_nodes(model, placements, flops)
    if side:
        placements = [
            NodePlacement(p.node_name, p.op_type, CPU, side[p.node_name])
            if p.node_name in side
            else p
            for p in placements
        ]
    segments = plan_segments(model, placements)
    for _ in range(8):
        # A CPU part that reads nothing (a constant output) costs the NPU no round trip.
        if not any(s.device == CPU and s.inputs for s in segments):
            break
        light = _light_islands(segments, placements, flops)
        if not light:
            break
        placements = [
            NodePlacement(p.node_name, p.op_type, CPU, light[p.node_name])
            if p.node_name in light
            else p
            for p in placements
        ]
        segments = plan_segments(model, placements)
    npu_params, total = param_counts(model, segments)
    return Plan(
        placements=tuple(placements),
        segments=tuple(segments),
        flops=flops,
        params_npu=npu_params,
        params_total=total,
        notes=tuple(notes),
    )


def _cpu_side_nodes(
    model: onnx.ModelProto,
    placements: Sequence[NodePlacement],
    flops: Mapping[str, float | None],
) -> dict[str, str]:
    """Light NPU nodes that read only what the CPU side has (graph inputs, constants, CPU
    outputs) and feed only CPU nodes, next to the CPU: computing them there saves a transfer."""
    graph = model.graph
    names = node_names(graph)
    device = {p.node_name: p.device for p in placements}
    if CPU not in device.values():
        return {}
    constant = constant_nodes(placements)
    producer = {o: n for n, node in zip(names, graph.node) for o in node.output if o}
    reads = {n: node_reads(node) for n, node in zip(names, graph.node)}
    consumers: dict[str, set[str]] = {n: set() for n in names}
    producers: dict[str, set[str]] = {n: set() for n in names}
    for n in names:
        for r in reads[n]:
            if r in producer:
                consumers[producer[r]].add(n)
                producers[n].add(producer[r])
    chosen: set[str] = set()
    for n in names:
        work = flops.get(n)
        if device[n] != NPU or n in constant or work is None or work >= LIGHT_SEGMENT_FLOPS:
            continue
        if all(device[p] == CPU or p in constant or p in chosen for p in producers[n]):
            chosen.add(n)
    changed = True
    while changed:
        changed = False
        for n in list(chosen):
            if any(device[c] != CPU and c not in chosen for c in consumers[n]):
                chosen.discard(n)
                changed = True
    # Only next to the CPU: never start a CPU segment of its own.
    reached = {n for n in chosen if any(device[m] == CPU for m in consumers[n] | producers[n])}
    stack = list(reached)
    while stack:
        n = stack.pop()
        for m in consumers[n] | producers[n]:
            if m in chosen and m not in reached:
                reached.add(m)
                stack.append(m)
    # Each connected group moves only if the group as a whole is light: a chain of many light
    # nodes (a whole small encoder) is real NPU work.
    moved: set[str] = set()
    seen: set[str] = set()
    for start in reached:
        if start in seen:
            continue
        group, stack = {start}, [start]
        while stack:
            n = stack.pop()
            for m in consumers[n] | producers[n]:
                if m in reached and m not in group:
                    group.add(m)
                    stack.append(m)
        seen |= group
        if sum(flops.get(n) or 0.0 for n in group) < LIGHT_SEGMENT_FLOPS:
            moved |= group
    reason = "light work that only feeds CPU parts: computed there to spare a transfer"
    return {n: reason for n in moved}


def _light_islands(
    segments: Sequence[Segment],
    placements: Sequence[NodePlacement],
    flops: Mapping[str, float | None],
) -> dict[str, str]:
    constant = constant_nodes(placements)
    moved: dict[str, str] = {}
    for s in segments:
        if s.device != NPU:
            continue
        work = [flops.get(n) for n in s.nodes if n not in constant]
        if not work or any(w is None for w in work):
            continue
        total = float(sum(w or 0.0 for w in work))
        if total < LIGHT_SEGMENT_FLOPS:
            reason = (
                f"light NPU work (~{si(total)}FLOPs in segment) between CPU parts: cheaper on "
                "the CPU than a round trip to the NPU"
            )
            moved.update((n, reason) for n in s.nodes if n not in constant)
    return moved
