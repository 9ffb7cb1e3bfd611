"""Placement rules, segments, opset lowering and the FLOP/parameter estimate, on models built here.

The rule table's claims about the converter are checked against the real rknn-toolkit2 at the end
(trial builds in child processes)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rkort import cost, graph, placement, rules
from rkort.compiler import BuildFailed, BuildSpec, ConverterCrashed, compile_blob, toolkit_version
from rkort.placement import CPU, NPU
from rkort.segments import plan_segments
from tests import models

needs_toolkit = pytest.mark.skipif(
    toolkit_version() is None, reason="rknn-toolkit2 is not installed"
)

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def vi(name: str, elem: int, shape: list | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def const(name: str, value: object, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def model_of(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    opset: int = 17,
    domains: tuple[tuple[str, int], ...] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)]
        + [helper.make_opsetid(d, v) for d, v in domains],
    )
    m.ir_version = 8 if opset <= 17 else 10
    return m


def where(model: onnx.ModelProto, target: str = "rk3588", **kw: object) -> dict[str, str]:
    return {p.node_name: p.device for p in rules.place(model, target, **kw)}  # type: ignore[arg-type]


def reasons(model: onnx.ModelProto, target: str = "rk3588", **kw: object) -> dict[str, str]:
    return {p.node_name: p.reason for p in rules.place(model, target, **kw)}  # type: ignore[arg-type]


def heavy(
    name: str, src: str, dst: str, width: int = 128
) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w_{name}")
    return helper.make_node("MatMul", [src, f"w_{name}"], [dst], name=name), w


X = vi("x", F, [1, 64, 128])
Y = vi("y", F, [1, 64, 128])


# -- the rules ------------------------------------------------------------------------------------


def test_supported_ops_stay_on_the_npu_and_say_why() -> None:
    m1, w1 = heavy("m1", "x", "h")
    m = model_of(
        [
            m1,
            helper.make_node("TopK", ["h", "k"], ["v", "i"], name="topk"),
            helper.make_node("Relu", ["v"], ["y"], name="relu"),
        ],
        [X],
        [vi("y", F, [1, 64, 4])],
        [w1, const("k", [4], np.int64)],
    )
    got = rules.place(m, "rk3588")
    assert {p.node_name: p.device for p in got} == {"m1": NPU, "topk": NPU, "relu": NPU}
    by = {p.node_name: p for p in got}
    assert by["m1"].reason == "supported by the converter"
    assert "RKNN runtime's own CPU kernels" in by["topk"].reason
    assert by["topk"].op_type == "TopK"


def test_user_forces_op_types_and_node_names(caplog: pytest.LogCaptureFixture) -> None:
    m1, w1 = heavy("m1", "x", "h")
    m2, w2 = heavy("m2", "r", "y")
    m = model_of([m1, helper.make_node("Relu", ["h"], ["r"], name="relu"), m2], [X], [Y], [w1, w2])
    assert where(m, force_cpu=["Relu"]) == {"m1": NPU, "relu": CPU, "m2": NPU}
    assert where(m, force_cpu=["m2"]) == {"m1": NPU, "relu": NPU, "m2": CPU}
    assert "op type Relu" in reasons(m, force_cpu=["Relu"])["relu"]
    assert "node name" in reasons(m, force_cpu=["m2"])["m2"]
    with caplog.at_level(logging.WARNING, logger="rkort"):
        where(m, force_cpu=["Softmax", "no_such_node"])
    assert "no_such_node" in caplog.text and "Softmax" in caplog.text


def test_ops_outside_the_standard_domain_go_to_the_cpu() -> None:
    m = model_of(
        [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft", name="gelu")],
        [X],
        [Y],
        domains=(("com.microsoft", 1),),
    )
    assert where(m) == {"gelu": CPU}
    assert "com.microsoft::Gelu" in reasons(m)["gelu"]


@pytest.mark.parametrize(
    ("elem", "word"),
    [
        (TensorProto.DOUBLE, "float64"),
        (TensorProto.UINT8, "uint8"),
        (TensorProto.UINT16, "uint16"),
        (TensorProto.BFLOAT16, "bfloat16"),
    ],
)
def test_tensor_types_the_converter_cannot_take(elem: int, word: str) -> None:
    m = model_of(
        [
            helper.make_node("Cast", ["x"], ["c"], to=elem, name="to"),
            helper.make_node("Cast", ["c"], ["y"], to=F, name="back"),
        ],
        [X],
        [Y],
    )
    assert where(m) == {"to": CPU, "back": CPU}
    assert word in reasons(m)["to"]


def test_strings_and_sequences_go_to_the_cpu() -> None:
    m = model_of(
        [
            helper.make_node("SequenceConstruct", ["x", "x"], ["s"], name="seq"),
            helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=0, name="cat"),
        ],
        [X],
        [vi("y", F, [2, 64, 128])],
    )
    assert where(m) == {"seq": CPU, "cat": CPU}
    assert "sequence" in reasons(m)["seq"]
    s = model_of(
        [helper.make_node("StringNormalizer", ["t"], ["u"], name="norm")],
        [vi("t", TensorProto.STRING, [4])],
        [vi("u", TensorProto.STRING, [4])],
    )
    assert where(s) == {"norm": CPU}


def test_data_dependent_shapes_and_everything_downstream_go_to_the_cpu() -> None:
    m1, w1 = heavy("m1", "x", "h")
    m = model_of(
        [
            m1,
            helper.make_node("NonZero", ["h"], ["nz"], name="nonzero"),
            helper.make_node("Cast", ["nz"], ["nzf"], to=F, name="cast"),
            helper.make_node("ReduceSum", ["nzf"], ["y"], keepdims=0, name="sum"),
        ],
        [X],
        [vi("y", F, [])],
        [w1],
    )
    assert where(m, input_shapes={"x": (1, 64, 128)}) == {
        "m1": NPU,
        "nonzero": CPU,
        "cast": CPU,
        "sum": CPU,
    }
    assert "NonZero 'nonzero'" in reasons(m)["cast"]


def test_inputs_the_converter_needs_constant() -> None:
    """Range over a runtime value goes to the CPU; Range over a shape (fixed by the signature)
    or a constant stays on the NPU (the converter folds it)."""
    m = model_of(
        [
            helper.make_node("Range", ["zero", "n", "one"], ["r"], name="runtime_range"),
            helper.make_node("Shape", ["x"], ["s"], start=1, end=2, name="shape"),
            helper.make_node("Squeeze", ["s"], ["len"], name="len"),
            helper.make_node("Range", ["izero", "len", "ione"], ["pos"], name="shape_range"),
            helper.make_node("Reshape", ["x", "n1"], ["y"], name="runtime_reshape"),
        ],
        [X, vi("n", F, []), vi("n1", I64, [2])],
        [vi("r", F, [None]), vi("pos", I64, [64]), vi("y", F, [None, None])],
        [
            const("zero", 0.0),
            const("one", 1.0),
            const("izero", 0, np.int64),
            const("ione", 1, np.int64),
        ],
    )
    got = where(m)
    assert got["runtime_range"] == CPU and got["runtime_reshape"] == CPU
    assert got["shape_range"] == NPU and got["shape"] == NPU
    assert "input 1 ('n')" in reasons(m)["runtime_range"]


def test_control_flow_goes_to_the_cpu() -> None:
    branch = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"])], "b", [], [vi("t", F, [1, 64, 128])]
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c"], ["c2"]),
            helper.make_node("Neg", ["v"], ["v2"]),
        ],
        "body",
        [vi("i", I64, []), vi("c", TensorProto.BOOL, []), vi("v", F, [1, 64, 128])],
        [vi("c2", TensorProto.BOOL, []), vi("v2", F, [1, 64, 128])],
    )
    m = model_of(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
            helper.make_node("Greater", ["s", "zero"], ["cond"], name="sign"),
            helper.make_node(
                "If", ["cond"], ["k"], then_branch=branch, else_branch=branch, name="if"
            ),
            helper.make_node("Loop", ["n", "true", "k"], ["y"], body=body, name="loop"),
        ],
        [X],
        [Y],
        [const("zero", 0.0), const("n", 2, np.int64), const("true", True, np.bool_)],
    )
    got = rules.place(m, "rk3588")
    by = {p.node_name: p for p in got}
    assert by["if"].device == CPU and "runtime condition" in by["if"].reason
    assert by["loop"].device == CPU and "Loop" in by["loop"].reason
    # The If's body reads x from the outer scope: the CPU segment takes x as an input.
    segments = plan_segments(m, got)
    cpu = next(s for s in segments if s.device == CPU)
    assert "x" in cpu.inputs and "if" in cpu.nodes


def test_reverse_sequence_never_goes_to_the_npu() -> None:
    m = model_of(
        [
            helper.make_node(
                "ReverseSequence", ["x", "lens"], ["y"], time_axis=1, batch_axis=0, name="rev"
            )
        ],
        [X],
        [Y],
        [const("lens", [10], np.int64)],
    )
    assert where(m) == {"rev": CPU}
    assert "sequence_lens" in reasons(m)["rev"]


@pytest.mark.parametrize("target", ["rk3588", "rk3576", "rk3568", "rk3566", "rk3562", "rv1126b"])
@pytest.mark.parametrize("op", ["CumSum", "Mod", "Floor", "GridSample"])
def test_ops_the_full_board_runtimes_lack(target: str, op: str) -> None:
    inputs = {
        "CumSum": ["x", "axis"],
        "Mod": ["x", "x"],
        "Floor": ["x"],
        "GridSample": ["img", "grid"],
    }
    attrs = {"Mod": {"fmod": 1}}.get(op, {})
    m = model_of(
        [helper.make_node(op, inputs[op], ["y"], name="op", **attrs)],
        [X, vi("img", F, [1, 4, 8, 8]), vi("grid", F, [1, 8, 8, 2])],
        [vi("y", F, None)],
        [const("axis", 1, np.int64)],
    )
    got = rules.place(m, target)
    assert got[0].device == CPU
    assert target in got[0].reason and "github" not in got[0].reason


def test_the_small_rv1106_runtime_keeps_only_npu_ops() -> None:
    m = model_of(
        [
            helper.make_node("Conv", ["img", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Exp", ["c"], ["e"], name="exp"),
            helper.make_node("Relu", ["e"], ["y"], name="relu"),
        ],
        [vi("img", F, [1, 4, 8, 8])],
        [vi("y", F, [1, 4, 8, 8])],
        [const("w", np.ones((4, 4, 3, 3)))],
    )
    for target in ("rv1106", "rv1103", "rv1106b", "rv1103b"):
        assert where(m, target) == {"conv": NPU, "exp": CPU, "relu": NPU}
        assert "librknnmrt" in reasons(m, target)["exp"]
    # Exp is fine where the runtime has its CPU kernel.
    assert where(m, "rk3588") == {"conv": NPU, "exp": NPU, "relu": NPU}


def test_constants_stay_off_the_runtime_rules_and_are_copied_into_segments() -> None:
    """A Floor of constants is folded by the converter (no runtime kernel needed), and a
    constant read by two segments is copied into both: it never crosses a boundary."""
    m1, w1 = heavy("m1", "x", "h")
    m2, w2 = heavy("m2", "c2", "y")
    m = model_of(
        [
            helper.make_node("Floor", ["three_and_half"], ["scale"], name="const_floor"),
            m1,
            helper.make_node("Mul", ["h", "scale"], ["hs"], name="scale1"),
            helper.make_node("CumSum", ["hs", "axis"], ["c"], name="cumsum"),
            helper.make_node("Mul", ["c", "scale"], ["c2"], name="scale2"),
            m2,
        ],
        [X],
        [Y],
        [w1, w2, const("three_and_half", 3.5), const("axis", 1, np.int64)],
    )
    got = rules.place(m, "rk3588")
    by = {p.node_name: p for p in got}
    assert by["const_floor"].device == NPU
    assert by["const_floor"].reason == placement.CONSTANT_REASON
    segments = plan_segments(m, got)
    assert [s.device for s in segments] == [NPU, CPU, NPU]
    assert "const_floor" in segments[0].nodes and "const_floor" in segments[2].nodes
    assert all("scale" not in s.inputs and "scale" not in s.outputs for s in segments)


# -- opsets above 19 --------------------------------------------------------------------------------


def test_opset21_is_lowered_to_19_keeping_node_names(tmp_path: Path) -> None:
    m = onnx.load(str(models.opset21_mlp(tmp_path).path))
    lowered, note = graph.lower_opset(m)
    assert graph.default_opset(lowered) == 19
    assert note is not None and "lowered to opset 19" in note
    assert graph.node_names(lowered.graph) == graph.node_names(m.graph)
    assert all(p.device == NPU for p in rules.place(lowered, "rk3588"))


def test_lowering_keeps_external_data_references(tmp_path: Path) -> None:
    src = onnx.load(str(models.opset21_mlp(tmp_path).path))
    path = tmp_path / "ext" / "m.onnx"
    path.parent.mkdir()
    onnx.save(src, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    m = onnx.load(str(path), load_external_data=False)
    lowered, _ = graph.lower_opset(m)
    w1 = next(t for t in lowered.graph.initializer if t.name == "w1")
    assert w1.data_location == TensorProto.EXTERNAL
    assert {e.key: e.value for e in w1.external_data}["location"] == "m.data"


def test_an_op_without_an_opset19_form_goes_to_the_cpu(tmp_path: Path) -> None:
    m = onnx.load(str(models.opset20_gelu(tmp_path).path))
    lowered, note = graph.lower_opset(m)
    assert lowered is m and note is not None and "Gelu" in note
    got = {p.node_name: p for p in rules.place(m, "rk3588")}
    assert got["gelu"].device == CPU and "opset-19" in got["gelu"].reason
    assert got["layer1"].device == NPU and got["layer2"].device == NPU


# -- segments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position", "devices"),
    [("start", [CPU, NPU]), ("middle", [NPU, CPU, NPU]), ("end", [NPU, CPU])],
)
def test_a_cpu_op_at_the_start_middle_and_end(
    tmp_path: Path, position: str, devices: list[str]
) -> None:
    m = onnx.load(str(models.cpu_op_at(tmp_path, position).path))
    plan = placement.plan(m, "rk3588")
    assert [s.device for s in plan.segments] == devices
    assert plan.segments[0].inputs == ("x",)
    assert plan.segments[-1].outputs == ("y",)
    # Exactly the tensors that cross: each boundary value is made once and read later.
    made = [o for s in plan.segments for o in s.outputs]
    assert len(made) == len(set(made))
    for i, s in enumerate(plan.segments[1:], 1):
        earlier = {o for t in plan.segments[:i] for o in t.outputs}
        assert set(s.inputs) <= earlier | {"x"}


def test_several_cpu_islands(tmp_path: Path) -> None:
    m = onnx.load(str(models.cpu_islands(tmp_path).path))
    plan = placement.plan(m, "rk3588")
    assert [s.device for s in plan.segments] == [NPU, CPU, NPU, CPU, NPU]
    by = {p.node_name: p for p in plan.placements}
    # The comparison feeding NonZero reads a graph input: it runs next to it, on the CPU.
    assert by["is_big"].device == CPU and "only feeds CPU parts" in by["is_big"].reason
    assert {by[n].device for n in ("cumsum", "mod", "reverse", "pick")} == {CPU}


def test_segments_are_as_few_as_the_graph_allows() -> None:
    """Two independent NPU branches around one CPU op: the planner runs both NPU parts that are
    ready before switching, so the CPU op does not split them."""
    a, wa = heavy("a", "x", "ha")
    b, wb = heavy("b", "x", "hb")
    c, wc = heavy("c", "cs", "hc")
    m = model_of(
        [
            a,
            helper.make_node("CumSum", ["ha", "axis"], ["cs"], name="cumsum"),
            b,
            c,
            helper.make_node("Add", ["hb", "hc"], ["y"], name="join"),
        ],
        [X],
        [Y],
        [wa, wb, wc, const("axis", 1, np.int64)],
    )
    segments = plan_segments(m, rules.place(m, "rk3588"))
    assert [(s.device, s.nodes) for s in segments] == [
        (NPU, ("a", "b")),
        (CPU, ("cumsum",)),
        (NPU, ("c", "join")),
    ]
    assert segments[0].outputs == ("ha", "hb")


def test_a_light_npu_island_between_cpu_parts_runs_on_the_cpu() -> None:
    m = model_of(
        [
            helper.make_node("CumSum", ["x", "axis"], ["c"], name="cumsum1"),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("CumSum", ["r", "axis"], ["y"], name="cumsum2"),
        ],
        [X],
        [Y],
        [const("axis", 1, np.int64)],
    )
    plan = placement.plan(m, "rk3588")
    assert [s.device for s in plan.segments] == [CPU]
    assert "light" in {p.node_name: p.reason for p in plan.placements}["relu"]


def test_an_all_npu_model_is_one_segment_however_light(tmp_path: Path) -> None:
    for build in models.RUNNABLE.values():
        m = onnx.load(str(build(tmp_path).path))
        plan = placement.plan(m, "rk3588")
        assert [s.device for s in plan.segments] == [NPU]
        assert plan.segments[0].outputs == tuple(o.name for o in m.graph.output)


# -- FLOPs and parameters ---------------------------------------------------------------------------


def test_flop_estimates() -> None:
    m = model_of(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Reshape", ["h", "shape"], ["img"], name="reshape"),
            helper.make_node("Conv", ["img", "k"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Flatten", ["c"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "g"], ["y"], transB=1, name="gemm"),
        ],
        [X],
        [vi("y", F, [1, 10])],
        [
            const("w", np.ones((128, 32))),
            const("shape", [1, 8, 16, 16], np.int64),
            const("k", np.ones((4, 8, 3, 3))),
            const("g", np.ones((10, 1024))),
        ],
    )
    types = graph.infer_types(m)
    flops = cost.estimate_flops(m, types)
    assert flops["mm"] == 2 * 64 * 32 * 128
    assert flops["reshape"] == 0
    assert flops["conv"] == 2 * (4 * 16 * 16) * 8 * 9
    assert flops["gemm"] == 2 * 10 * 1024


def test_shares_of_flops_and_parameters(tmp_path: Path) -> None:
    m = onnx.load(str(models.cpu_op_at(tmp_path, "middle").path))
    plan = placement.plan(m, "rk3588")
    matmul = 2 * 64 * 128 * 128
    elementwise = 64 * 128
    assert plan.flops_total == 2 * matmul + 3 * elementwise  # relu, cumsum, damp
    assert plan.npu_flop_share == pytest.approx((2 * matmul + 2 * elementwise) / plan.flops_total)
    assert plan.params_total == 2 * 128 * 128 + 2  # w1, w2, axis, eighth
    assert plan.params_npu == 2 * 128 * 128 + 1  # the CumSum's axis is on the CPU
    forced = placement.plan(m, "rk3588", ["MatMul"])
    assert forced.npu_flop_share is not None and forced.npu_flop_share < 0.01


# -- the rule table against the real converter ------------------------------------------------------


def _trial(directory: Path, name: str, m: onnx.ModelProto) -> str | None:
    """None if rknn-toolkit2 builds the one-op model, else its error."""
    path = directory / f"{name}.onnx"
    onnx.save(m, str(path))
    types = graph.infer_types(m)
    initializers = {t.name for t in m.graph.initializer}
    ins = [i.name for i in m.graph.input if i.name not in initializers]
    outs = [o.name for o in m.graph.output]
    spec = BuildSpec(
        str(path),
        tuple(ins),
        tuple(types[n].static_shape or () for n in ins),
        tuple(helper.tensor_dtype_to_np_dtype(types[n].elem_type).name for n in ins),
        tuple(outs),
        tuple(types[n].static_shape or (1,) for n in outs),
        tuple(helper.tensor_dtype_to_np_dtype(types[n].elem_type).name for n in outs),
    )
    try:
        compile_blob(spec, directory / f"{name}.rknn", progress=False)
    except (BuildFailed, ConverterCrashed) as e:  # uint8 makes the converter abort
        return str(e)
    return None


@needs_toolkit
def test_rules_that_say_the_converter_refuses_hold(tmp_path: Path) -> None:
    """Each op the table sends to the CPU for failing to build fails a trial build, while the
    same graphs with the op replaced by a supported one build (so the failure is the op's)."""
    m1, w1 = heavy("m1", "x", "h", width=16)
    small = vi("x", F, [1, 64, 16])
    branch = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["t"])], "b", [], [vi("t", F, [1, 64, 16])]
    )
    cases = {
        "nonzero": model_of(
            [m1, helper.make_node("NonZero", ["h"], ["y"])], [small], [vi("y", I64, [3, 8])], [w1]
        ),
        "range": model_of(
            [helper.make_node("Range", ["zero", "n", "one"], ["y"])],
            [vi("n", F, [])],
            [vi("y", F, [8])],
            [const("zero", 0.0), const("one", 1.0)],
        ),
        "if": model_of(
            [
                m1,
                helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
                helper.make_node("Greater", ["s", "zero"], ["c"]),
                helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
            ],
            [small],
            [vi("y", F, [1, 64, 16])],
            [w1, const("zero", 0.0)],
        ),
        "uint8": model_of(
            [
                helper.make_node("Cast", ["x"], ["u"], to=TensorProto.UINT8),
                helper.make_node("Cast", ["u"], ["y"], to=F),
            ],
            [small],
            [vi("y", F, [1, 64, 16])],
        ),
        "opset20": model_of(
            [helper.make_node("Relu", ["x"], ["y"])], [small], [vi("y", F, [1, 64, 16])], opset=20
        ),
        "topk_supported": model_of(
            [m1, helper.make_node("TopK", ["h", "k"], ["y", "i"])],
            [small],
            [vi("y", F, [1, 64, 4]), vi("i", I64, [1, 64, 4])],
            [w1, const("k", [4], np.int64)],
        ),
    }
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(lambda k: _trial(tmp_path, k, cases[k]), cases)))
    assert results["topk_supported"] is None
    assert "need to be constant" in (results["nonzero"] or "")
    assert "need to be constant" in (results["range"] or "")
    assert "dynamic graph" in (results["if"] or "")
    assert "Not Support Dtype" in (results["uint8"] or "")
    assert "opset 20" in (results["opset20"] or "")
    # ... and placement sends each of those nodes to the CPU (an opset-20 Relu is lowered).
    for name in ("nonzero", "range", "if", "uint8"):
        got = rules.place(cases[name], "rk3588")
        assert any(p.device == CPU for p in got), (name, got)
    lowered, _ = graph.lower_opset(cases["opset20"])
    assert graph.default_opset(lowered) == 19
