"""``rkort inspect``: placement, reasons, segments and the NPU's share, before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from rkort.cli import main
from rkort.cli.inspect import build_report, format_text
from tests import models

MATMUL = 2 * 64 * 128 * 128
ELEMENTWISE = 64 * 128


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = models.cpu_op_at(tmp_path, "middle")
    code, out, _ = run_cli(capsys, str(model.path), "--target", "rk3588", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["target"] == "rk3588" and report["opset"] == 17
    assert report["input_shapes"] == {"x": [1, 64, 128]}
    by = {p["node"]: p for p in report["placements"]}
    assert len(by) == report["node_count"] == 6
    assert by["cumsum"]["device"] == "cpu" and "CumSum" in by["cumsum"]["reason"]
    assert by["layer1"]["device"] == "npu" and by["layer1"]["flops"] == MATMUL
    assert [(s["device"], s["nodes"]) for s in report["segments"]] == [
        ("npu", 3),
        ("cpu", 1),
        ("npu", 2),
    ]
    assert report["segments"][1]["inputs"] == ["hr"] and report["segments"][1]["outputs"] == ["c"]
    assert by["cumsum"]["segments"] == [1]
    total = 2 * MATMUL + 3 * ELEMENTWISE
    assert report["flops"] == {"npu": total - ELEMENTWISE, "total": total}
    assert report["npu_flop_share"] == pytest.approx((total - ELEMENTWISE) / total)
    assert report["params"] == {"npu": 2 * 128 * 128 + 1, "total": 2 * 128 * 128 + 2}


def test_text_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = models.cpu_islands(tmp_path)
    code, out, _ = run_cli(capsys, str(model.path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{model.path} for rk3588 (opset 17, 17 nodes)")
    assert "inputs: x=1x64x128, ids=1x64" in out
    assert "segments: 5 (3 NPU, 2 CPU)" in out
    assert "on the NPU: 99." in out and "of FLOPs" in out and "of parameters" in out
    rows = [line for line in lines if line.startswith("  cpu") or line.startswith("  npu")]
    assert len(rows) == 17
    reverse = next(line for line in rows if " reverse " in line)
    assert reverse.startswith("  cpu") and "sequence_lens" in reverse


def test_forcing_ops_and_nodes_onto_the_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = models.cpu_op_at(tmp_path, "middle")
    _, out, _ = run_cli(capsys, str(model.path), "--json", "--cpu-ops", "MatMul")
    report = json.loads(out)
    assert report["npu_flop_share"] < 0.01
    assert {p["node"] for p in report["placements"] if "forced" in p["reason"]} == {
        "layer1",
        "layer2",
    }
    _, out, _ = run_cli(capsys, str(model.path), "--json", "--cpu-nodes", "layer2")
    by = {p["node"]: p for p in json.loads(out)["placements"]}
    assert by["layer2"]["device"] == "cpu" and by["layer1"]["device"] == "npu"


def test_targets_change_the_placement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = models.opset20_gelu(tmp_path)
    _, out, _ = run_cli(capsys, str(model.path), "--json", "--target", "rv1106")
    report = json.loads(out)
    assert report["target"] == "rv1106" and report["opset"] == 20
    assert any("Gelu" in note for note in report["notes"])
    assert {p["node"]: p["device"] for p in report["placements"]}["gelu"] == "cpu"


def test_dynamic_dims(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proto = onnx.load(str(models.cpu_op_at(tmp_path, "middle").path))
    for vi in list(proto.graph.input) + list(proto.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "dynamic.onnx"
    onnx.save(proto, str(path))
    _, out, _ = run_cli(capsys, str(path), "--json")
    report = json.loads(out)
    assert report["input_shapes"] == {"x": [1, 64, 128]}
    assert any("taken as 1" in note for note in report["notes"])
    _, out, _ = run_cli(capsys, str(path), "--json", "--shape", "x=4x64x128")
    report = json.loads(out)
    assert report["input_shapes"] == {"x": [4, 64, 128]}
    assert report["flops"]["total"] == 4 * (2 * MATMUL + 3 * ELEMENTWISE)
    assert not any("taken as 1" in note for note in report["notes"])


def test_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = models.cpu_op_at(tmp_path, "middle")
    code, _, err = run_cli(capsys, str(model.path), "--shape", "nope=1x2")
    assert code == 2 and "no input named ['nope']" in err
    code, _, err = run_cli(capsys, str(model.path), "--shape", "x=1x64x7")
    assert code == 2 and "does not fit" in err
    code, _, err = run_cli(capsys, str(tmp_path / "missing.onnx"))
    assert code == 1 and "missing.onnx" in err


def test_report_functions_without_the_cli(tmp_path: Path) -> None:
    model = models.mlp(tmp_path)
    report = build_report(model.path, "rk3588")
    assert report["npu_flop_share"] == 1.0 and report["npu_param_share"] == 1.0
    assert [s["device"] for s in report["segments"]] == ["npu"]
    text = format_text(report)
    assert "segments: 1 (1 NPU, 0 CPU)" in text and "100.0% of FLOPs" in text
