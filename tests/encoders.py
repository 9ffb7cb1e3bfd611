"""Small transformer encoders with random weights, exported to ONNX with dynamic batch and
sequence axes (named as optimum names them), for the dynamic-shape tests."""

from __future__ import annotations

import warnings
from pathlib import Path

DYNAMIC = {0: "batch_size", 1: "sequence_length"}


def export_encoder(kind: str, directory: Path, max_len: int = 64, vocab: int = 1000) -> Path:
    """``kind``: bert (ids, mask, token type ids), distilbert (ids, mask) or roberta (ids, mask;
    positions offset by the pad id, as RoBERTa has them)."""
    import torch
    from transformers import (
        BertConfig,
        BertModel,
        DistilBertConfig,
        DistilBertModel,
        RobertaConfig,
        RobertaModel,
    )

    torch.manual_seed(0)
    small = dict(vocab_size=vocab, hidden_size=64, num_attention_heads=2, intermediate_size=128)
    names = ["input_ids", "attention_mask"]
    if kind == "bert":
        model = BertModel(BertConfig(num_hidden_layers=2, max_position_embeddings=max_len, **small))
        names.append("token_type_ids")
    elif kind == "distilbert":
        model = DistilBertModel(
            DistilBertConfig(
                vocab_size=vocab,
                dim=64,
                n_heads=2,
                hidden_dim=128,
                n_layers=2,
                max_position_embeddings=max_len,
            )
        )
    elif kind == "roberta":
        model = RobertaModel(
            RobertaConfig(
                num_hidden_layers=2, max_position_embeddings=max_len + 2, pad_token_id=1, **small
            )
        )
    else:
        raise ValueError(kind)
    model.eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *args):  # type: ignore[no-untyped-def]
            return self.inner(**dict(zip(names, args))).last_hidden_state

    example = tuple(torch.ones(2, 8, dtype=torch.int64) for _ in names)
    path = directory / f"{kind}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder(),
            example,
            str(path),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={**{n: DYNAMIC for n in names}, "last_hidden_state": DYNAMIC},
            opset_version=17,
            dynamo=False,
        )
    return path
