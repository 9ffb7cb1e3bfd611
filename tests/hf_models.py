"""Small Hugging Face models built here (random weights, a tokenizer from a vocabulary written here)
and exported to ONNX with optimum, for the optimum / sentence-transformers / install tests.

Nothing is downloaded: every model is made from a config, saved with ``save_pretrained``, and
exported by optimum's own ``main_export``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WORDS = (
    "the a cat dog sat on mat ran fast slow red blue big small happy sad and is was very "
    "who where what when did go home park tree house river boat sun rain snow day night"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(f"w{i}" for i in range(60))]
TEXTS = [
    "the cat sat on the mat",
    "a very big red dog ran fast to the park and the small blue cat was sad",
]
QUESTION = "where did the dog go"
CONTEXT = "the big red dog ran to the park on a sunny day and the cat sat on the mat at home"

#: task -> (transformers class, optimum class)
TASKS = {
    "text-classification": ("BertForSequenceClassification", "ORTModelForSequenceClassification"),
    "feature-extraction": ("BertModel", "ORTModelForFeatureExtraction"),
    "token-classification": ("BertForTokenClassification", "ORTModelForTokenClassification"),
    "question-answering": ("BertForQuestionAnswering", "ORTModelForQuestionAnswering"),
}


def tokenizer(directory: Path) -> Any:
    """A BertTokenizerFast over :data:`VOCAB`, saved into ``directory``."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), model_max_length=64)
    tok.save_pretrained(directory)
    return tok


def transformers_model(task: str, directory: Path, seed: int = 0) -> Path:
    """A 2-layer BERT for ``task`` with random weights, saved with its tokenizer in ``directory``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels={"token-classification": 5, "question-answering": 2}.get(task, 3),
    )
    config.id2label = {i: f"LABEL_{i}" for i in range(config.num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = getattr(transformers, TASKS[task][0])(config).eval()
    model.save_pretrained(directory)
    tokenizer(directory)
    return directory


def export(
    model_dir: Path,
    output: Path,
    task: str,
    *,
    static: tuple[int, int] | None = None,
    validate: bool = False,
) -> Path:
    """optimum's ``main_export`` of ``model_dir`` into ``output``: dynamic batch and sequence
    axes, or, with ``static=(batch, sequence)``, those fixed sizes."""
    from optimum.exporters.onnx import main_export

    shapes: dict[str, Any] = {}
    if static is not None:
        shapes = {"no_dynamic_axes": True, "batch_size": static[0], "sequence_length": static[1]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's chatter
        main_export(
            str(model_dir),
            output=str(output),
            task=task,
            do_validation=validate,
            **shapes,
        )
    return output


def optimum_class(task: str) -> Any:
    import optimum.onnxruntime

    return getattr(optimum.onnxruntime, TASKS[task][1])


def inputs(tok: Any, task: str, tensors: str, *, batch: int = 2, length: int | None = None) -> Any:
    """Tokenized inputs for ``task`` (``tensors`` "np" or "pt"), padded to the longest, or to
    ``length`` when given."""
    padding: Any = "max_length" if length else True
    if task == "question-answering":
        return tok(
            [QUESTION] * batch,
            [CONTEXT] * batch,
            padding=padding,
            max_length=length,
            truncation=bool(length),
            return_tensors=tensors,
        )
    return tok(
        TEXTS[:batch] if batch <= len(TEXTS) else (TEXTS * batch)[:batch],
        padding=padding,
        max_length=length,
        truncation=bool(length),
        return_tensors=tensors,
    )


def outputs(result: Any) -> dict[str, np.ndarray]:
    """The arrays of an optimum ModelOutput (torch tensors or numpy arrays), by name."""
    arrays = {}
    for key, value in result.items():
        if value is None:
            continue
        arrays[key] = value.detach().numpy() if hasattr(value, "detach") else np.asarray(value)
    return arrays


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator else float(np.array_equal(a, b))
