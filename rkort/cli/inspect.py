"""``rkort inspect``: before anything runs, where each node of a model would run and why, the
segments, and the share of FLOPs and of parameters on the NPU.

The FLOP estimate comes from shapes inferred for one input signature (dynamic dims the user did
not fix are taken as 1, and the report says so): 2 per multiply-add for MatMul, Gemm, Conv,
ConvTranspose, Einsum, attention ops and recurrent ops, 0 for data movement (Reshape, Transpose,
Gather, ...), 1 per output element for everything else. Parameters are initializer elements; one
used by any NPU segment counts on the NPU.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import onnx

from .. import placement
from ..branching import branch_files, model_branching
from ..cache import Cache
from ..graph import default_opset
from ..kvcache import find_layout
from ..masked import masked_source, model_mask
from ..model import ModelSource
from ..options import RKNNOptions
from ..padding import make_policy
from ..planner import Planner
from ..platform import default_target
from ..rules import CPU, NPU
from ..selfmask import MASK_INPUT, POSITIONS_INPUT, added_shapes
from ..shapes import declared_types, signature_of
from .common import UsageError

_LIST_LIMIT = 3


def build_report(
    model_path: str | os.PathLike[str],
    target: str,
    force_cpu: Collection[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    cache: Cache | None = None,
    cpu_session: Any = None,
) -> dict[str, Any]:
    """The inspect report as plain data (what ``--json`` prints): the decision a session makes
    for the signature, with the trial-build verdicts a warmed cache holds for it, and how each
    dynamic dim is handled (padded to buckets or compiled per size, and why)."""
    path = os.fspath(model_path)
    source = ModelSource(path)
    proto = source.proto
    shapes, assumed = _signature(proto, input_shapes or {})
    options = RKNNOptions.parse({"target": target, "cpu_ops": ",".join(force_cpu)})
    cache = cache if cache is not None else Cache()
    masked, masking = masked_source(source, cache), []
    if masked is not None:  # what its sessions run: rkort's copy with a mask over the past
        mask = model_mask(source, cache)
        assert mask is not None
        shapes = {**shapes, **added_shapes(shapes, mask)}
        source, proto, cpu_session = masked, masked.proto, None
        masking.append(
            "a decoder with a past and no mask over it: sessions run rkort's copy, which takes "
            f"a mask over past + new tokens ({MASK_INPUT})"
            + (f" and the new tokens' positions ({POSITIONS_INPUT})" if mask.positions else "")
            + f" ({masked.path.name})"
        )
    planner = Planner(source, options, cache)
    dims = _dim_report(source, options, cache, cpu_session)
    decision, _ = planner.decide(shapes)
    plan = decision.plan if decision.plan is not None else planner.place(shapes, decision.rejected)
    notes = [*masking, *plan.notes]
    if decision.recorded:
        notes.append(
            f"trial builds from the cache's record ({decision.trial_builds} builds with "
            f"rknn-toolkit2 {decision.toolkit})"
        )
    if assumed:
        fixed = ", ".join(f"{n}={_dims(s)}" for n, s in assumed.items())
        notes.append(
            f"dynamic dims taken as 1 for the estimate ({fixed}); give --shape NAME=DIMxDIM for "
            "the shapes you run"
        )
    notes.extend(_branch_notes(source, options, cache, shapes))
    unknown = [n for n, f in plan.flops.items() if f is None]
    if unknown:
        notes.append(f"{len(unknown)} node(s) have no FLOP estimate (shapes unknown)")
    in_segments: dict[str, list[int]] = {}
    for s in plan.segments:
        for n in s.nodes:
            in_segments.setdefault(n, []).append(s.index)
    segments = []
    for s in plan.segments:
        work = sum(plan.flops.get(n) or 0.0 for n in dict.fromkeys(s.nodes))
        segments.append(
            {
                "index": s.index,
                "device": s.device,
                "nodes": len(s.nodes),
                "node_names": list(s.nodes),
                "inputs": list(s.inputs),
                "outputs": list(s.outputs),
                "flops": work,
            }
        )
    return {
        "model": path,
        "target": target,
        "opset": default_opset(proto),
        "node_count": len(proto.graph.node),
        "input_shapes": {n: list(s) for n, s in shapes.items()},
        "npu_flop_share": plan.npu_flop_share,
        "npu_param_share": plan.npu_param_share,
        "flops": {"npu": plan.flops_npu, "total": plan.flops_total},
        "params": {"npu": plan.params_npu, "total": plan.params_total},
        "segments": segments,
        "placements": [
            {
                "node": p.node_name,
                "op_type": p.op_type,
                "device": _shown_device(p, in_segments, plan.segments),
                "reason": p.reason,
                "segments": in_segments.get(p.node_name, []),
                "flops": plan.flops.get(p.node_name),
            }
            for p in plan.placements
        ],
        "dims": dims,
        "notes": notes,
    }


def _dim_report(
    source: ModelSource, options: RKNNOptions, cache: Cache, cpu_session: Any
) -> dict[str, dict[str, Any]]:
    """Each dynamic dim: padded ("batch", "sequence", with its buckets) or "exact", and why."""
    if cpu_session is None:
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

        cpu_session = InferenceSession(str(source.path), providers=["CPUExecutionProvider"])
    policy = make_policy(
        source, cpu_session.get_inputs(), cpu_session.get_outputs(), options, cache
    )
    return {
        s: {
            "kind": kind,
            "buckets": list(policy.buckets[s]) if kind not in ("exact", "total") else None,
            "reason": policy.reasons.get(s, ""),
        }
        for s, kind in policy.kind.items()
    }


def format_text(report: Mapping[str, Any]) -> str:
    """The report as the text ``rkort inspect`` prints."""
    lines = [
        f"{report['model']} for {report['target']} "
        f"(opset {report['opset']}, {report['node_count']} nodes)",
        "inputs: "
        + (", ".join(f"{n}={_dims(s)}" for n, s in report["input_shapes"].items()) or "none"),
    ]
    flops, params = report["flops"], report["params"]
    lines.append(
        f"on the NPU: {_share(report['npu_flop_share'])} of FLOPs "
        f"({_si(flops['npu'])}FLOP of {_si(flops['total'])}FLOP), "
        f"{_share(report['npu_param_share'])} of parameters "
        f"({_si(params['npu']).strip()} of {_si(params['total']).strip()})"
    )
    segs = report["segments"]
    n_npu = sum(1 for s in segs if s["device"] == NPU)
    lines.append(f"segments: {len(segs)} ({n_npu} NPU, {len(segs) - n_npu} CPU)")
    for s in segs:
        count = f"{s['nodes']} node{'' if s['nodes'] == 1 else 's'}"
        lines.append(
            f"  #{s['index']:<3} {s['device']}  {count:>10}  {_si(s['flops']):>7}FLOP  "
            f"in: {_names(s['inputs'])}  out: {_names(s['outputs'])}"
        )
    lines.append("nodes:")
    rows = report["placements"]
    op_width = max([len(p["op_type"]) for p in rows] + [2])
    name_width = min(max([len(p["node"]) for p in rows] + [4]), 60)
    for p in rows:
        where = ",".join(str(i) for i in p["segments"]) or "-"
        lines.append(
            f"  {p['device']}  {p['op_type']:<{op_width}}  {p['node']:<{name_width}}  "
            f"[{where}]  {p['reason']}"
        )
    for symbol, d in report.get("dims", {}).items():
        if d["kind"] == "exact":
            lines.append(f"dim '{symbol}': compiled per size: {d['reason']}")
        elif d["buckets"] is None:
            lines.append(f"dim '{symbol}': {d['kind']}: {d['reason']}")
        else:
            sizes = ",".join(map(str, d["buckets"]))
            lines.append(f"dim '{symbol}': {d['kind']} padded to {sizes}: {d['reason']}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _shown_device(
    p: placement.NodePlacement,
    in_segments: Mapping[str, list[int]],
    segments: Sequence[placement.Segment],
) -> str:
    """A constant runs where the segments that copy it run (the NPU when any of them does)."""
    if p.reason != placement.CONSTANT_REASON or not in_segments.get(p.node_name):
        return p.device
    devices = {segments[i].device for i in in_segments[p.node_name]}
    return NPU if NPU in devices else CPU


def _branch_notes(
    source: ModelSource, options: RKNNOptions, cache: Cache, shapes: Mapping[str, Sequence[int]]
) -> list[str]:
    """For Ifs decided at run time: what sessions run (the condition on the CPU, each branch
    as its own program), with each branch's own plan for these input shapes."""
    split = model_branching(source, cache)
    if not split.ifs:
        return []
    notes = [
        f"If {', '.join(repr(i) for i in split.ifs)} decided at run time: sessions run the "
        "condition on the CPU and the chosen branch as its own program"
    ]
    for label, path in branch_files(source, split, cache).items():
        if label == "conditions":
            continue
        branch = Planner(ModelSource(path), options, cache)
        try:
            names = {i.name for i in branch.source.proto.graph.input}
            plan = branch.place({n: s for n, s in shapes.items() if n in names})
            segs = plan.segments
            npu = sum(1 for s in segs if s.device == NPU)
            notes.append(
                f"branch {label}: {_share(plan.npu_flop_share)} of its FLOPs on the NPU "
                f"({len(segs)} segment(s), {npu} NPU)"
            )
        except Exception as e:  # noqa: BLE001 - a branch the estimate cannot plan
            notes.append(f"branch {label}: no estimate ({type(e).__name__}: {str(e)[:120]})")
        finally:
            branch.close()
    return notes


def _signature(
    proto: onnx.ModelProto, given: Mapping[str, Sequence[int]]
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(every input's shape, those whose dynamic dims were taken as 1; a decoder's past + new
    tokens as 2, so the estimate's shapes agree). A dim named like one of a given input takes
    its size (give one past_key_values input, the others follow)."""
    shapes = signature_of(proto, given, fill=1)
    declared = declared_types(proto)
    names = list(shapes)
    kv = find_layout(names, [declared[n].shape or () for n in names])
    known = {
        d: size
        for n in given
        for d, size in zip(declared[n].shape or (), shapes[n])
        if isinstance(d, str)
    }
    if kv is not None and kv.total not in known and {kv.past, kv.sequence} <= set(known):
        known[kv.total] = known[kv.past] + known[kv.sequence]
    assumed: dict[str, tuple[int, ...]] = {}
    for n, shape in shapes.items():
        dims = declared[n].shape
        if n in given or declared[n].static_shape is not None or dims is None:
            continue
        fill = {**({kv.total: 2} if kv is not None else {}), **known}
        shape = tuple(
            fill.get(d, size) if isinstance(d, str) else size for d, size in zip(dims, shape)
        )
        shapes[n] = shape
        if any(d not in known for d in dims if isinstance(d, str)):
            assumed[n] = shape
    return shapes, assumed


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _names(names: Sequence[str]) -> str:
    if not names:
        return "-"
    shown = ", ".join(names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return shown + (f" (+{more} more)" if more > 0 else "")


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} "


def cmd_inspect(args: argparse.Namespace) -> int:
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    # onnxruntime reads and checks the model first: its errors are the ones the session gives.
    cpu_session = InferenceSession(args.model, providers=["CPUExecutionProvider"])
    force = [x for x in (args.cpu_ops or "").split(",") + (args.cpu_nodes or "").split(",") if x]
    try:
        report = build_report(
            args.model,
            (args.target or default_target()).lower(),
            force,
            dict(args.shape or []),
            Cache(args.cache_dir),
            cpu_session,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return 0
