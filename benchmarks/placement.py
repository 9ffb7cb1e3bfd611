"""Placement over a small zoo: the share of FLOPs and of parameters planned for the NPU, and the
number of segments, per model and target (what `rkort inspect` reports, before anything runs)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _common import ROOT, log, md_table, publish

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def zoo(directory: Path) -> list[tuple[str, Path, dict[str, tuple[int, ...]]]]:
    from tests import models
    from tests.encoders import export_encoder

    seq = {"input_ids": (1, 128), "attention_mask": (1, 128)}
    bert = export_encoder("bert", directory, max_len=128)
    return [
        ("BERT encoder (h64, 2 layers)", bert, {**seq, "token_type_ids": (1, 128)}),
        ("DistilBERT encoder", export_encoder("distilbert", directory, max_len=128), seq),
        (
            "RoBERTa encoder (CumSum positions)",
            export_encoder("roberta", directory, max_len=128, vocab=40000),
            seq,
        ),
        ("CNN (Conv+Relu+Pool)", models.conv_relu(directory).path, {}),
        ("BERT h128 with a CumSum inserted", models.bert_with_cpu_op(directory).path, {}),
        (
            "MLP with CPU islands (CumSum, Mod, ReverseSequence, NonZero)",
            models.cpu_islands(directory).path,
            {},
        ),
        ("If + Loop", models.control_flow(directory).path, {}),
    ]


def main() -> None:
    from rkort.cli.inspect import build_report

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, shapes in zoo(Path(tmp)):
            for target in ("rk3588", "rk3566"):
                log(f"planning {name} for {target}")
                r = build_report(str(path), target, [], shapes)
                segs = r["segments"]
                npu = sum(1 for s in segs if s["device"] == "npu")
                rows.append(
                    [
                        name,
                        target,
                        f"{100 * r['npu_flop_share']:.1f} %",
                        f"{100 * r['npu_param_share']:.1f} %",
                        f"{len(segs)} ({npu} NPU, {len(segs) - npu} CPU)",
                    ]
                )
    publish(
        "placement",
        "Placement: share of the work planned for the NPU",
        [
            md_table(
                ["model", "target", "FLOPs on the NPU", "parameters on the NPU", "segments"], rows
            ),
            "FLOPs are estimated from inferred shapes (sequence 128 for the encoders); parameters "
            "count initializer elements (an embedding table gathered on the CPU counts there).",
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
