"""A decided program, running: its segments in order, NPU ones on a Runner and CPU ones on an
onnxruntime session, intermediate values handed from one to the next and freed after last use."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Runner, RunnerClosed
from .decision import Decision, Part
from .feed import cast_output, contiguous
from .rules import NPU

SegmentHook = Callable[["ProgramSegment", int, int], None]


class ProgramSegment:
    """One part of a program, ready to run: an NPU Runner or an onnxruntime CPU session."""

    def __init__(
        self,
        part: Part,
        *,
        runner: Runner | None = None,
        session: Any = None,
        model_path: Path | None = None,
    ) -> None:
        self.part = part
        self.runner = runner
        self.session = session
        self.model_path = model_path
        self.output_dtypes = tuple(
            np.dtype(d) for d in (part.spec.output_dtypes if part.spec is not None else ())
        )
        self._output_shapes = tuple(
            tuple(s) for s in (part.spec.output_shapes if part.spec is not None else ())
        )

    @property
    def spec(self) -> Any:
        return self.part.spec

    @property
    def index(self) -> int:
        return self.part.index

    @property
    def device(self) -> str:
        return self.part.device

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.part.nodes

    @property
    def node_count(self) -> int:
        return len(self.part.nodes)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.part.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.part.outputs

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The segment's outputs (in ``outputs`` order, declared dtypes) for its inputs."""
        runner, session = self.runner, self.session  # close() may clear them meanwhile
        if runner is not None:
            # The NPU takes and gives no 0-d tensor: a scalar travels as a [1] vector.
            outs = runner.run([contiguous(a.reshape(1) if a.ndim == 0 else a) for a in arrays])
            return [
                cast_output(o.reshape(()) if s == () else o, dt)
                for o, dt, s in zip(outs, self.output_dtypes, self._output_shapes)
            ]
        if session is None:
            raise RunnerClosed(f"segment {self.index} ({self.device}) is closed")
        return list(session.run(list(self.outputs), dict(zip(self.inputs, arrays))))

    def close(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()
        self.session = None

    def __repr__(self) -> str:
        return (
            f"<ProgramSegment {self.index} {self.device} {self.node_count} nodes "
            f"{list(self.inputs)} -> {list(self.outputs)}>"
        )


class Program:
    """The running form of a :class:`~rkort.planner.Decision`.

    ``open_npu(part)`` returns a Runner for an NPU part, ``open_cpu(part)`` an onnxruntime
    session and its file for a CPU part; ``constants`` holds graph outputs no part makes.
    """

    def __init__(
        self,
        decision: Decision,
        open_npu: Callable[[Part], Runner],
        open_cpu: Callable[[Part], tuple[Any, Path]],
        constants: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.decision = decision
        self.input_names = decision.input_names
        self.output_names = decision.output_names
        self.input_shapes = dict(decision.signature)
        self._constants = dict(constants or {})
        self._closed = False
        # Calls running now, and whether the engine has let the program go: a retired program
        # closes when its last call ends, never under one.
        self._users = 0
        self._retired = False
        self._use = threading.Lock()
        self.segments: list[ProgramSegment] = []
        try:
            for part in decision.parts:
                if part.device == NPU:
                    path = Path(part.spec.model_path) if part.spec is not None else None
                    self.segments.append(
                        ProgramSegment(part, runner=open_npu(part), model_path=path)
                    )
                else:
                    session, path = open_cpu(part)
                    self.segments.append(ProgramSegment(part, session=session, model_path=path))
        except BaseException:
            self.close()
            raise
        self._release_after = self._last_uses()

    # What a decision says, for callers that hold the program.
    @property
    def placements(self) -> Any:
        return self.decision.plan.placements if self.decision.plan is not None else ()

    @property
    def rejected(self) -> Mapping[str, str]:
        return self.decision.rejected

    @property
    def trial_builds(self) -> int:
        return self.decision.trial_builds

    @property
    def notes(self) -> tuple[str, ...]:
        return self.decision.notes

    @property
    def npu_segments(self) -> list[ProgramSegment]:
        return [s for s in self.segments if s.device == NPU]

    def run(
        self, inputs: Sequence[np.ndarray], on_segment: SegmentHook | None = None
    ) -> list[np.ndarray]:
        """Graph inputs in order -> graph outputs in order. ``on_segment(segment, start_ns,
        end_ns)`` is called after each segment (``time.perf_counter_ns`` clock)."""
        if self._closed:
            raise RunnerClosed("this program is closed")
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"this program takes {len(self.input_names)} inputs {list(self.input_names)}, "
                f"got {len(inputs)}"
            )
        env: dict[str, Any] = dict(self._constants)
        for name, array in zip(self.input_names, inputs):
            shape = self.input_shapes[name]
            if tuple(np.shape(array)) != shape:
                raise ValueError(
                    f"input {name!r} has shape {list(np.shape(array))}; this program was "
                    f"planned for {list(shape)}"
                )
            env[name] = array
        for seg in self.segments:
            feed = [env[n] for n in seg.inputs]
            started = time.perf_counter_ns()
            outs = seg.run(feed)
            ended = time.perf_counter_ns()
            if on_segment is not None:
                on_segment(seg, started, ended)
            env.update(zip(seg.outputs, outs))
            for name in self._release_after.get(seg.index, ()):
                env.pop(name, None)
        return [env[n] for n in self.output_names]

    def acquire(self) -> None:
        """A call starts using this program (see :meth:`retire`)."""
        with self._use:
            self._users += 1

    def release(self) -> None:
        """A call is done with this program."""
        with self._use:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self.close()

    def retire(self) -> None:
        """Close once no call uses the program (at once if none does)."""
        with self._use:
            self._retired = True
            close = self._users == 0
        if close:
            self.close()

    def close(self) -> None:
        """Close every NPU runner and drop the CPU sessions."""
        self._closed = True
        for seg in self.segments:
            seg.close()

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kinds = ", ".join(f"{s.device}:{s.node_count}" for s in self.segments)
        return f"<Program {len(self.segments)} segments [{kinds}]>"

    def _last_uses(self) -> dict[int, list[str]]:
        """For each segment, the values no later segment reads (freed after it runs)."""
        last: dict[str, int] = {}
        for seg in self.segments:
            for n in seg.inputs:
                last[n] = seg.index
        keep = set(self.output_names)
        out: dict[int, list[str]] = {}
        for name, index in last.items():
            if name not in keep:
                out.setdefault(index, []).append(name)
        return out
