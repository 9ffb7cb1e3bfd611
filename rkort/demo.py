"""``python -m rkort.demo``: rkort's main job, end to end, on a model built here.

Builds a small BERT-style text classifier with random weights (transformers, no model hub),
exports it to ONNX, then runs it the onnxruntime way on the RKNN provider and on the CPU
provider, and compares the two.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def build_model(directory: Path, seq: int = 32) -> Path:
    """A 2-layer BERT classifier (random weights) exported to ONNX with a static [1, seq] shape."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=512,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.int64)
    path = directory / "bert-tiny-cls.onnx"

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer chatter
        torch.onnx.export(
            Logits(),
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
        )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--target",
        default=None,
        help="SoC to compile for (default: this board's, rk3588 on a host)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rkort.toolkit").setLevel(logging.WARNING)

    import rkort as onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        print("building a 2-layer BERT classifier with random weights and exporting it to ONNX ...")
        path = build_model(Path(tmp))
        rng = np.random.default_rng(0)
        feed = {
            "input_ids": rng.integers(0, 30522, (1, 32)).astype(np.int64),
            "attention_mask": np.ones((1, 32), np.int64),
        }
        options = {"target": args.target} if args.target else {}
        t0 = time.monotonic()
        npu = onnxruntime.InferenceSession(
            path, providers=[("RKNNExecutionProvider", options), "CPUExecutionProvider"]
        )
        opened = time.monotonic() - t0
        cpu = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = npu.run(None, feed)[0]
        want = cpu.run(None, feed)[0]
        cos = float(got.ravel() @ want.ravel() / (np.linalg.norm(got) * np.linalg.norm(want)))
        print(f"session providers: {npu.get_providers()} (opened in {opened:.1f} s)")
        print(f"RKNN logits: {np.round(got, 4).tolist()}")
        print(f"CPU  logits: {np.round(want, 4).tolist()}")
        print(f"cosine similarity RKNN vs CPU: {cos:.6f}")


if __name__ == "__main__":
    main()
