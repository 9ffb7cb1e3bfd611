"""What a decision is: the parts that run for one signature (NPU ones with their BuildSpec and blob
key), and its record form, the JSON kept in the cache so that another machine reads the same
decision without planning it again."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import placement
from .rules import NPU
from .segments import Segment
from .shapes import Signature
from .spec import BuildSpec

#: ``paths(source, segment, signature)`` -> the file a recorded NPU part is built from here.
PathsFor = Callable[[str, Segment, Signature], str]


@dataclass(frozen=True)
class Part:
    """One segment of a decided program. NPU parts carry what their blob is built from
    (``spec``), its cache key (``key``) and which file that is (``source``: "model", the model
    file itself; "lowered", the whole model at opset 19; "segment", a segment file)."""

    segment: Segment
    spec: BuildSpec | None = None
    key: str | None = None
    source: str = "segment"

    @property
    def index(self) -> int:
        return self.segment.index

    @property
    def device(self) -> str:
        return self.segment.device

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.segment.nodes

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.segment.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.segment.outputs


@dataclass(frozen=True)
class Decision:
    """What runs for one signature: ``parts`` in run order. ``plan`` holds the placement behind
    them (None when the decision was read from a record); ``recorded`` says it was; ``confirmed``
    that its NPU parts were built (here or when it was recorded)."""

    signature: Signature
    parts: tuple[Part, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    rejected: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    trial_builds: int = 0
    plan: placement.Plan | None = None
    recorded: bool = False
    confirmed: bool = False
    toolkit: str | None = None
    npu_flop_share: float | None = None
    #: Why nodes run on the CPU (distinct reasons, at most a few), for messages.
    cpu_reasons: tuple[str, ...] = ()

    @property
    def npu_parts(self) -> list[Part]:
        return [p for p in self.parts if p.device == NPU]

    @property
    def constant_outputs(self) -> list[str]:
        """Graph outputs no part makes (initializers)."""
        made = {o for p in self.parts for o in p.outputs}
        return [o for o in self.output_names if o not in made]


def to_record(decision: Decision, config: str) -> dict[str, Any]:
    """The JSON body of a decision's record (``config``: the planner's configuration digest)."""
    return {
        "config": config,
        "signature": [[n, list(s)] for n, s in decision.signature.items()],
        "parts": [
            {
                "device": p.device,
                "nodes": list(p.nodes),
                "inputs": list(p.inputs),
                "outputs": list(p.outputs),
                "source": p.source,
                "key": p.key,
                "spec": p.spec.to_json() if p.spec is not None else None,
            }
            for p in decision.parts
        ],
        "input_names": list(decision.input_names),
        "output_names": list(decision.output_names),
        "rejected": dict(decision.rejected),
        "notes": list(decision.notes),
        "trial_builds": decision.trial_builds,
        "toolkit": decision.toolkit,
        "npu_flop_share": decision.npu_flop_share,
        "cpu_reasons": list(decision.cpu_reasons),
    }


def from_record(
    body: Mapping[str, Any], paths: PathsFor, build_config: Mapping[str, Any]
) -> Decision:
    """The decision a record holds; KeyError, TypeError or ValueError when it is malformed."""
    sig = {str(n): tuple(int(d) for d in s) for n, s in body["signature"]}
    parts = []
    for i, p in enumerate(body["parts"]):
        seg = Segment(i, p["device"], tuple(p["nodes"]), tuple(p["inputs"]), tuple(p["outputs"]))
        if p["device"] != NPU:
            parts.append(Part(seg))
            continue
        source = str(p["source"])
        spec = BuildSpec.from_json(p["spec"], paths(source, seg, sig), **build_config)
        parts.append(Part(seg, spec, str(p["key"]), source))
    return Decision(
        signature=sig,
        parts=tuple(parts),
        input_names=tuple(body["input_names"]),
        output_names=tuple(body["output_names"]),
        rejected=dict(body.get("rejected", {})),
        notes=tuple(body.get("notes", ())),
        trial_builds=int(body.get("trial_builds", 0)),
        recorded=True,
        confirmed=True,
        toolkit=body.get("toolkit"),
        npu_flop_share=body.get("npu_flop_share"),
        cpu_reasons=tuple(body.get("cpu_reasons", ())),
    )
