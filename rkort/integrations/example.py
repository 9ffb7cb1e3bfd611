"""``python -m rkort.integrations.example DIR``: a model to try the integrations on, built here.

Writes into DIR, with nothing downloaded:

- ``DIR/hf``: a 2-layer BERT text classifier (random weights) and its tokenizer, saved with
  ``save_pretrained`` (a vocabulary written here);
- ``DIR/onnx``: that model exported by optimum (dynamic batch and sequence axes), with its
  tokenizer, ready for ``ORTModelForSequenceClassification.from_pretrained``;
- ``DIR/app.py``: an onnxruntime program written without rkort in mind, for ``rkort run``;
- with ``--decoder gpt2`` or ``--decoder llama`` instead: ``DIR/onnx``, a small causal language
  model (random weights) exported by optimum with a KV cache, for ``ORTModelForCausalLM``; with
  ``--seq2seq t5|bart|whisper``, an encoder-decoder for ``ORTModelForSeq2SeqLM`` or
  ``ORTModelForSpeechSeq2Seq``.

Needs the ``hf`` extra (transformers, optimum, torch).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

_WORDS = (
    "the a cat dog sat on mat ran fast slow red blue big small happy sad and is was very "
    "who where what when did go home park tree house river boat sun rain snow day night"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS]

APP = '''\
"""Classifies a sentence with onnxruntime, as onnxruntime's own examples do."""

import sys

import numpy as np
import onnxruntime as ort

sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
ids = np.array([[2, 5, 7, 9, 10, 5, 11, 3]], dtype=np.int64)  # [CLS] the cat sat on the mat [SEP]
feed = {
    "input_ids": ids,
    "attention_mask": np.ones_like(ids),
    "token_type_ids": np.zeros_like(ids),
}
feed = {i.name: feed[i.name] for i in sess.get_inputs()}
logits = sess.run(None, feed)[0]
print("providers:", sess.get_providers())
print("logits:", logits.round(4))
'''


def build(directory: Path, seed: int = 0) -> Path:
    """Build the classifier, export it and write the app into ``directory``; returns it."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    hf = directory / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    (hf / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(hf / "vocab.txt"), model_max_length=128).save_pretrained(hf)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    BertForSequenceClassification(config).eval().save_pretrained(hf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer chatter
        main_export(str(hf), output=str(directory / "onnx"), task="text-classification")
    (directory / "app.py").write_text(APP)
    return directory


def build_decoder(
    directory: Path, family: str = "gpt2", layers: int = 2, width: int = 64, seed: int = 0
) -> Path:
    """A causal LM of ``family`` ("gpt2", or "llama": rotary positions, grouped KV heads) with
    random weights, exported by optimum with a KV cache into ``directory/onnx``; returns that."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(2, width // 32)
    if family == "gpt2":
        config = GPT2Config(
            n_layer=layers, n_head=heads, n_embd=width, vocab_size=1000, n_positions=256
        )
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=heads // 2,
                hidden_size=width,
                intermediate_size=2 * width,
                vocab_size=1000,
                max_position_embeddings=256,
            )
        )
    else:
        raise ValueError(f"family {family!r}: gpt2 or llama")
    model.eval().save_pretrained(directory / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer chatter
        exported = ORTModelForCausalLM.from_pretrained(
            directory / "hf", export=True, use_cache=True
        )
    exported.save_pretrained(directory / "onnx")
    return directory / "onnx"


def build_seq2seq(directory: Path, family: str = "t5", seed: int = 0, merged: bool = False) -> Path:
    """A small encoder-decoder of ``family`` ("t5", "bart", "marian" or "whisper") with random
    weights, exported by optimum with a KV cache into ``directory/onnx``; returns that.
    ``merged``: optimum's legacy layout, the two decoders merged into
    ``decoder_model_merged.onnx`` (an If on ``use_cache_branch``)."""
    import torch
    import transformers as tf
    from optimum.onnxruntime import ORTModelForSeq2SeqLM, ORTModelForSpeechSeq2Seq

    torch.manual_seed(seed)
    small = {"vocab_size": 1000, "d_model": 64, "decoder_start_token_id": 2}
    # BART, Marian and Whisper share their layer settings' names.
    layers = {
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
        **small,
    }
    ends = {"pad_token_id": 1, "eos_token_id": 999}
    if family == "t5":
        model = tf.T5ForConditionalGeneration(
            tf.T5Config(d_kv=16, d_ff=128, num_layers=2, num_heads=4, **small)
        )
    elif family == "bart":
        model = tf.BartForConditionalGeneration(
            tf.BartConfig(max_position_embeddings=256, **layers)
        )
    elif family == "marian":
        model = tf.MarianMTModel(tf.MarianConfig(max_position_embeddings=256, **ends, **layers))
    elif family == "whisper":
        model = tf.WhisperForConditionalGeneration(
            tf.WhisperConfig(
                num_mel_bins=80,
                max_source_positions=1500,
                max_target_positions=128,
                bos_token_id=1,
                suppress_tokens=[],
                begin_suppress_tokens=[],
                **ends,
                **layers,
            )
        )
    else:
        raise ValueError(f"family {family!r}: t5, bart, marian or whisper")
    model.eval().save_pretrained(directory / "hf")
    cls = ORTModelForSpeechSeq2Seq if family == "whisper" else ORTModelForSeq2SeqLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer chatter
        exported = cls.from_pretrained(directory / "hf", export=True, use_cache=True)
    exported.save_pretrained(directory / "onnx")
    if merged:
        from optimum.onnx import merge_decoders

        out = directory / "onnx"
        decoders = [out / "decoder_model.onnx", out / "decoder_with_past_model.onnx"]
        # strict=False: the decoder with a past returns no cross-attention keys; the merged
        # model gives placeholders there, as optimum's own merged exports do.
        merge_decoders(*decoders, save_path=out / "decoder_model_merged.onnx", strict=False)
        for f in decoders:
            f.unlink()
    return directory / "onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--decoder", choices=("gpt2", "llama"), help="build a causal LM with a KV cache instead"
    )
    parser.add_argument(
        "--seq2seq",
        choices=("t5", "bart", "marian", "whisper"),
        help="build an encoder-decoder with a KV cache instead",
    )
    parser.add_argument(
        "--merged",
        action="store_true",
        help="with --seq2seq: merge its decoders into decoder_model_merged.onnx (optimum's "
        "legacy layout)",
    )
    args = parser.parse_args()
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("optimum").setLevel(logging.ERROR)
    if args.seq2seq:
        out = build_seq2seq(args.directory, args.seq2seq, merged=args.merged)
        print(f"optimum ONNX export with a KV cache: {out}")
        return
    if args.decoder:
        print(f"optimum ONNX export with a KV cache: {build_decoder(args.directory, args.decoder)}")
        return
    out = build(args.directory)
    print(f"transformers model: {out / 'hf'}")
    print(f"optimum ONNX export: {out / 'onnx'}")
    print(
        f"onnxruntime app: {out / 'app.py'}  (run: rkort run -- python {out / 'app.py'} {out / 'onnx' / 'model.onnx'})"
    )


if __name__ == "__main__":
    main()
