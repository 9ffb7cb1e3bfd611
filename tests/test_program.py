"""Programs: models cut into NPU and CPU segments, run against onnxruntime on the whole model.

NPU segments run on the real rknn-toolkit2 simulator (one worker per segment); the fast tests
give the same Programs onnxruntime CPU runners for their NPU segments, which checks the cutting
and wiring exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rkort import graph
from rkort.backends.base import Runner, RunnerClosed
from rkort.backends.cpu import open_cpu
from rkort.cache import Cache
from rkort.compiler import BuildSpec, toolkit_version
from rkort.model import ModelSource
from rkort.options import RKNNOptions
from rkort.placement import CPU, NPU, Segment
from rkort.planner import Part, Planner
from rkort.program import Program
from tests import models

needs_toolkit = pytest.mark.skipif(
    toolkit_version() is None, reason="rknn-toolkit2 is not installed"
)

#: name -> (builder, the segments' devices).
CASES: dict[str, tuple[Callable[[Path], models.TestModel], list[str]]] = {
    "cpu_op_at_start": (lambda d: models.cpu_op_at(d, "start"), [CPU, NPU]),
    "cpu_op_at_middle": (lambda d: models.cpu_op_at(d, "middle"), [NPU, CPU, NPU]),
    "cpu_op_at_end": (lambda d: models.cpu_op_at(d, "end"), [NPU, CPU]),
    "cpu_islands": (models.cpu_islands, [NPU, CPU, NPU, CPU, NPU]),
    "control_flow": (models.control_flow, [NPU, CPU, NPU]),
    "opset20_gelu": (models.opset20_gelu, [NPU, CPU, NPU]),
    "opset21_mlp": (models.opset21_mlp, [NPU]),
}
SIMULATED = {**CASES, "bert_with_cpu_op": (models.bert_with_cpu_op, [NPU, CPU, NPU])}


def open_simulator(spec: BuildSpec) -> Runner:
    from rkort.backends.simulator import open_simulator as open_sim

    return open_sim(spec, progress=False)


def make_program(
    model: str | Path,
    directory: Path,
    shapes: dict[str, tuple[int, ...]],
    given: list[Segment] | None,
    open_npu: Callable[[BuildSpec], Runner],
    *,
    trial_builds: bool = False,
) -> Program:
    """The program a session makes for one signature: the planner's decision, NPU parts opened
    with ``open_npu`` (with ``trial_builds``, through the planner's trial builds, which correct
    a wrong plan), CPU parts on onnxruntime."""
    planner = Planner(
        ModelSource(model),
        RKNNOptions.parse({"target": "rk3588"}),
        Cache(directory / "cache"),
        directory,
    )

    def build(part: Part) -> Runner:
        assert part.spec is not None
        return open_npu(part.spec)

    decision, handles = planner.decide(shapes, build if trial_builds else None, given=given)

    def npu(part: Part) -> Runner:
        if part.key in handles:
            return handles.pop(part.key)
        planner.ensure_file(decision, part)
        assert part.spec is not None
        return open_npu(part.spec)

    def cpu(part: Part) -> tuple[ort.InferenceSession, Path]:
        path = planner.cpu_file(decision, part)
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path

    constants = planner.files(dict(decision.signature)).constants(decision.constant_outputs)
    return Program(decision, npu, cpu, constants)


def reference(model: models.TestModel, feed: list[np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(model.input_names, feed)))


def feeds(name: str, model: models.TestModel) -> list[list[np.ndarray]]:
    first, second = model.make_feed(0), model.make_feed(1)
    if name == "control_flow":  # the If takes the other branch for the negated input
        second = [-first[0]]
    return [first, second]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def assert_close(got: list[np.ndarray], want: list[np.ndarray], exact_floats: bool) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if w.dtype.kind in "iub":
            np.testing.assert_array_equal(g, w)
        elif exact_floats:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        else:
            assert cosine(g, w) >= 0.9999


# -- the whole model is the special case -----------------------------------------------------------


@pytest.mark.parametrize("name", list(models.RUNNABLE))
def test_an_all_npu_model_is_one_segment_with_the_engines_spec(tmp_path: Path, name: str) -> None:
    model = models.RUNNABLE[name](tmp_path)
    specs: list[BuildSpec] = []

    def open_npu(spec: BuildSpec) -> Runner:
        specs.append(spec)
        return open_cpu(spec)

    with make_program(model.path, tmp_path / "segments", {}, None, open_npu) as program:
        assert [s.device for s in program.segments] == [NPU]
        assert specs == [models.spec_of(model, target="rk3588")]
        feed = model.make_feed(0)
        assert_close(program.run(feed), reference(model, feed), exact_floats=True)
    assert list((tmp_path / "segments").glob("*.onnx")) == []  # nothing extracted


# -- cutting and wiring, exactly (NPU segments on onnxruntime runners) ----------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_segments_wired_exactly(tmp_path: Path, name: str) -> None:
    build, devices = CASES[name]
    model = build(tmp_path)
    with make_program(model.path, tmp_path / "segments", {}, None, open_cpu) as program:
        assert [s.device for s in program.segments] == devices
        for feed in feeds(name, model):
            assert_close(program.run(feed), reference(model, feed), exact_floats=True)


def test_a_model_with_dynamic_dims_gets_static_segments(tmp_path: Path) -> None:
    model = models.cpu_op_at(tmp_path, "middle")
    proto = onnx.load(str(model.path))
    for vi in list(proto.graph.input) + list(proto.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "dynamic.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ValueError, match="dynamic shape"):
        make_program(path, tmp_path / "a", {}, None, open_cpu)
    with pytest.raises(ValueError, match="does not fit"):
        make_program(path, tmp_path / "b", {"x": (3, 64, 7)}, None, open_cpu)
    specs: list[BuildSpec] = []

    def open_npu(spec: BuildSpec) -> Runner:
        specs.append(spec)
        return open_cpu(spec)

    with make_program(path, tmp_path / "c", {"x": (3, 64, 128)}, None, open_npu) as program:
        assert [s.device for s in program.segments] == [NPU, CPU, NPU]
        assert [s.input_shapes for s in specs] == [((3, 64, 128),), ((3, 64, 128),)]
        x = np.random.default_rng(0).standard_normal((3, 64, 128)).astype(np.float32)
        want = ort.InferenceSession(str(path)).run(None, {"x": x})
        assert_close(program.run([x]), want, exact_floats=True)
        with pytest.raises(ValueError, match="planned for"):
            program.run([x[:1]])
        with pytest.raises(ValueError, match="takes 1 inputs"):
            program.run([x, x])


def test_profiling_hook_sees_every_segment_in_order(tmp_path: Path) -> None:
    model = models.cpu_islands(tmp_path)
    seen: list[tuple[int, str, int, int]] = []
    with make_program(model.path, tmp_path / "segments", {}, None, open_cpu) as program:
        program.run(
            model.make_feed(0), on_segment=lambda s, a, b: seen.append((s.index, s.device, a, b))
        )
        assert [(i, d) for i, d, _, _ in seen] == [(s.index, s.device) for s in program.segments]
        assert all(end >= start for _, _, start, end in seen)
        assert all(later[2] >= earlier[3] for earlier, later in zip(seen, seen[1:]))
        assert [s.node_count for s in program.segments] == [len(s.nodes) for s in program.segments]
    with pytest.raises(RunnerClosed):
        program.run(model.make_feed(0))


def test_external_data_stays_external_and_the_source_is_untouched(tmp_path: Path) -> None:
    model = models.cpu_op_at(tmp_path, "middle")
    source = tmp_path / "ext"
    source.mkdir()
    path = source / "model.onnx"
    onnx.save(
        onnx.load(str(model.path)),
        str(path),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    before = sorted(p.name for p in source.iterdir())
    with make_program(path, tmp_path / "segments", {}, None, open_cpu) as program:
        assert [s.device for s in program.segments] == [NPU, CPU, NPU]
        for seg in program.segments:
            assert seg.model_path.stat().st_size < 20_000  # weights are not copied in
        assert (tmp_path / "segments" / "weights.bin").exists()
        feed = model.make_feed(0)
        assert_close(program.run(feed), reference(model, feed), exact_floats=True)
    assert sorted(p.name for p in source.iterdir()) == before


def test_caller_given_segments_are_used(tmp_path: Path) -> None:
    model = models.cpu_op_at(tmp_path, "middle")
    proto = onnx.load(str(model.path))
    from rkort import placement

    plan = placement.plan(proto, "rk3588", ["layer2"])
    assert [s.device for s in plan.segments] == [NPU, CPU]
    with make_program(model.path, tmp_path / "segments", {}, plan.segments, open_cpu) as program:
        assert [s.nodes for s in program.segments] == [s.nodes for s in plan.segments]
        feed = model.make_feed(0)
        assert_close(program.run(feed), reference(model, feed), exact_floats=True)


# -- on the simulator -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], tuple]]:
    """Programs on the simulator, built once per module on first use."""
    built: dict[str, tuple[models.TestModel, Program]] = {}
    root = tmp_path_factory.mktemp("simulated")

    def get(name: str) -> tuple[models.TestModel, Program]:
        if name not in built:
            directory = root / name
            directory.mkdir()
            model = SIMULATED[name][0](directory)
            built[name] = (
                model,
                make_program(
                    model.path, directory / "segments", {}, None, open_simulator, trial_builds=True
                ),
            )
        return built[name]

    yield get
    for _, program in built.values():
        program.close()


@needs_toolkit
@pytest.mark.parametrize("name", list(SIMULATED))
def test_matches_onnxruntime_on_the_simulator(simulated: Callable[[str], tuple], name: str) -> None:
    model, program = simulated(name)
    assert [s.device for s in program.segments] == SIMULATED[name][1]
    for seg in program.npu_segments:
        assert seg.spec is not None and seg.runner is not None and seg.runner.name == "simulator"
    for feed in feeds(name, model):
        assert_close(program.run(feed), reference(model, feed), exact_floats=False)


@needs_toolkit
def test_npu_segments_take_static_shapes_and_opset19_files(
    simulated: Callable[[str], tuple],
) -> None:
    _, program = simulated("opset20_gelu")
    first, _, last = program.segments
    assert first.spec.input_shapes == ((1, 64, 128),) and first.spec.output_shapes == (
        (1, 64, 128),
    )
    for seg in (first, last):
        assert graph.default_opset(onnx.load(str(seg.model_path))) == 19
    assert any("Gelu" in note for note in program.notes)
    _, whole = simulated("opset21_mlp")
    (only,) = whole.segments
    assert only.spec.model_path.endswith("model-opset19.onnx")
    assert only.spec.input_names == ("x",) and only.spec.output_names == ("y",)


@needs_toolkit
def test_external_data_on_the_simulator(tmp_path: Path) -> None:
    model = models.cpu_op_at(tmp_path, "middle")
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save(
        onnx.load(str(model.path)),
        str(path),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    with make_program(
        path, tmp_path / "segments", {}, None, open_simulator, trial_builds=True
    ) as program:
        assert [s.device for s in program.segments] == [NPU, CPU, NPU]
        feed = model.make_feed(0)
        assert_close(program.run(feed), reference(model, feed), exact_floats=False)


@needs_toolkit
def test_a_node_the_converter_names_goes_to_the_cpu(tmp_path: Path) -> None:
    """A caller's plan that puts a Range with a runtime input on the NPU: the trial build refuses
    it (by the node's name, or by its output whose shape a static build cannot know: the 0-d
    input 'n' reaches the build as a [1] vector), that node goes to the CPU, and the program
    still matches onnxruntime."""
    model = models.runtime_range(tmp_path)
    wrong = [Segment(0, NPU, ("layer1", "range"), ("x", "n"), ("y", "r"))]
    with make_program(
        model.path, tmp_path / "segments", {}, wrong, open_simulator, trial_builds=True
    ) as program:
        by = {p.node_name: p for p in program.placements}
        assert by["range"].device == CPU
        assert by["range"].reason.startswith("a trial build rejects it")
        reason = by["range"].reason
        assert "Range('range')" in reason or "the shape of 'r' cannot be inferred" in reason
        assert program.rejected.keys() == {"range"}
        assert program.trial_builds == 2  # the refused build, then layer1 alone
        feed = model.make_feed(0)
        assert_close(program.run(feed), reference(model, feed), exact_floats=False)


@needs_toolkit
def test_bisection_finds_the_node_the_converter_aborts_on(tmp_path: Path) -> None:
    """The converter aborts on a uint16 tensor without naming a node: bisecting the segment
    finds the Cast that makes it."""
    model = models.uint16_roundtrip(tmp_path)
    proto = onnx.load(str(model.path))
    names = tuple(graph.node_names(proto.graph))
    wrong = [Segment(0, NPU, names, ("x",), ("y",))]
    with make_program(
        model.path, tmp_path / "segments", {}, wrong, open_simulator, trial_builds=True
    ) as program:
        assert program.rejected.keys() == {"to_u16"}
        assert "Not Support Dtype" in program.rejected["to_u16"]
        by = {p.node_name: p for p in program.placements}
        assert by["to_u16"].device == CPU and by["layer1"].device == NPU
        feed = model.make_feed(0)
        assert_close(program.run(feed), reference(model, feed), exact_floats=False)
