"""Decoders with a KV cache: what a generation costs through rkort on the host simulator.

For a small GPT-2 and a small Llama-style model (random weights, built and exported here with
optimum's ORTModelForCausalLM, ``use_cache=True``), greedy ``generate()`` of 24 new tokens from
an 8-token prompt:

1. compiles per generation, NPU and CPU calls, and whether the tokens are the CPU provider's:
   rkort's KV-cache buckets (past padded on the left) against the past compiled per length
   (``exact_dims``, rkort before this), both on an empty cache;
2. one decode step (past of 10 tokens, padded to 16) side by side: rkort's ``run()``, the raw
   toolkit's ``inference()`` of a blob built for the same padded shapes in this process, and
   onnxruntime on the CPU (unpadded); rkort's overhead per token is the difference to the raw
   toolkit;
3. the share of a decode step's FLOPs rkort plans for the NPU (``rkort inspect``);
4. encoder-decoders (T5, BART, Whisper, and BART with optimum's merged decoder; small, random
   weights): a greedy generation's compiles and calls with rkort's mask and positions over the
   past (the past bucketed) against the past compiled per length.

    .venv/bin/python benchmarks/decoding.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    ROOT,
    TARGET,
    Stats,
    cosine,
    interleave,
    log,
    md_table,
    ms,
    private_default_cache,
    publish,
    quiet_fds,
    ratio,
    secs,
    toolkit_data_formats,
)

from rkort.integrations.example import build_decoder, build_seq2seq

PROMPT = 8
NEW_TOKENS = 24
STEP_PAST = 10
CALLS = 200


def generate(model: Any) -> tuple[np.ndarray, float]:
    import torch

    ids = torch.arange(1, PROMPT + 1)[None]
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )
    return out.numpy(), time.perf_counter() - start


def generation_rows(onnx_dir: Path, cache: Path) -> list[list[Any]]:
    from optimum.onnxruntime import ORTModelForCausalLM

    import rkort

    rkort.install()
    cpu = ORTModelForCausalLM.from_pretrained(onnx_dir, use_cache=True)
    want, cpu_s = generate(cpu)
    rows = [["onnxruntime CPU", "-", "-", "-", "-", secs(cpu_s), "-"]]
    for label, extra in (
        ("rkort, KV-cache buckets", {}),
        ("rkort, past compiled per length (before)", {"exact_dims": "past_sequence_length"}),
    ):
        log(f"  generate: {label}")
        npu = ORTModelForCausalLM.from_pretrained(
            onnx_dir,
            use_cache=True,
            provider="RKNN",
            provider_options={"cache_dir": str(cache / label.split(",")[1].strip()), **extra},
        )
        got, first_s = generate(npu)
        _, again_s = generate(npu)
        stats = rkort.session_stats(npu.session)
        rows.append(
            [
                label,
                stats["compiles"],
                stats["npu_calls"],
                stats["cpu_calls"],
                "yes" if np.array_equal(got, want) else "NO",
                f"{secs(first_s)} (again: {secs(again_s)})",
                ratio(again_s, cpu_s),
            ]
        )
    return rows


def step_feed(onnx_path: Path) -> dict[str, np.ndarray]:
    """A decode step after STEP_PAST tokens: the past from onnxruntime's own prompt."""
    import onnxruntime as ort

    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in ref.get_inputs()]
    pasts = [n for n in names if n.startswith("past_key_values")]
    shape = ref.get_inputs()[names.index(pasts[0])].shape
    ids = np.arange(1, STEP_PAST + 1, dtype=np.int64)[None]
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        **{n: np.zeros((1, shape[1], 0, shape[3]), np.float32) for n in pasts},
    }
    if "position_ids" in names:
        feed["position_ids"] = np.arange(STEP_PAST, dtype=np.int64)[None]
    out = ref.run(None, feed)
    step = {
        "input_ids": np.array([[7]], np.int64),
        "attention_mask": np.ones((1, STEP_PAST + 1), np.int64),
        **dict(zip(pasts, out[1:])),
    }
    if "position_ids" in names:
        step["position_ids"] = np.array([[STEP_PAST]], np.int64)
    return step


def step_rows(onnx_dir: Path, cache: Path) -> tuple[list[list[Any]], float]:
    import onnxruntime as ort
    from rknn.api import RKNN

    import rkort

    path = onnx_dir / "model.onnx"
    feed = step_feed(path)
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sess = rkort.InferenceSession(
        str(path),
        providers=[
            ("RKNNExecutionProvider", {"cache_dir": str(cache / "step")}),
            "CPUExecutionProvider",
        ],
    )
    got = sess.run(None, feed)
    want = cpu.run(None, feed)
    # The raw toolkit: a blob for the padded shapes rkort runs (the past padded on the left to
    # 16, the mask with it), built and run in this process.
    names = [i.name for i in cpu.get_inputs()]
    padded = []
    for name in names:
        a = feed[name]
        if name.startswith("past_key_values"):
            a = np.pad(a, [(0, 0), (0, 0), (16 - a.shape[2], 0), (0, 0)])
        elif name == "attention_mask":
            a = np.pad(a, [(0, 0), (16 - STEP_PAST, 0)])
        padded.append(a)
    with quiet_fds(cache / "toolkit.log"):
        rknn = RKNN(verbose=False)
        rknn.config(target_platform=TARGET)
        rknn.load_onnx(str(path), inputs=names, input_size_list=[list(a.shape) for a in padded])
        rknn.build(do_quantization=False)
        rknn.init_runtime()
    raw_inputs = [np.ascontiguousarray(a) for a in padded]
    formats = toolkit_data_formats([a.shape for a in padded])
    with quiet_fds(cache / "toolkit.log"):  # the toolkit's warnings on every inference
        samples = interleave(
            {
                "rkort": lambda: sess.run(None, feed),
                "raw": lambda: rknn.inference(inputs=raw_inputs, data_format=formats),
                "cpu": lambda: cpu.run(None, feed),
            },
            CALLS,
            5,
        )
    with quiet_fds(cache / "toolkit.log"):
        rknn.release()
    med = {k: Stats.of(v).median for k, v in samples.items()}
    rows = [
        ["raw toolkit inference(), padded shapes", ms(med["raw"]), "1.00x", "-"],
        [
            "rkort run()",
            ms(med["rkort"]),
            ratio(med["rkort"], med["raw"]),
            f"{(med['rkort'] - med['raw']) * 1e3:+.2f} ms",
        ],
        ["onnxruntime CPU (unpadded)", ms(med["cpu"]), ratio(med["cpu"], med["raw"]), "-"],
    ]
    return rows, min(cosine(w, g) for w, g in zip(want, got))


def npu_share(onnx_dir: Path) -> str:
    path = onnx_dir / "model.onnx"
    feed = step_feed(path)
    shapes = []
    for name, a in feed.items():
        size = a.shape
        if name.startswith("past_key_values"):
            size = (*size[:2], 16, *size[3:])
        if name == "attention_mask":
            size = (1, 17)
        shapes += ["--shape", f"{name}={'x'.join(map(str, size))}"]
    done = subprocess.run(
        [sys.executable, "-m", "rkort", "inspect", str(path), "--json", *shapes],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode:
        return f"inspect failed: {done.stderr.strip()[-200:]}"
    report = json.loads(done.stdout)
    return f"{report['npu_flop_share'] * 100:.1f} % ({len(report['segments'])} segment(s))"


SEQ2SEQ_TOKENS = 16


def seq2seq_rows(tmp: Path) -> list[list[Any]]:
    """Greedy generate() of SEQ2SEQ_TOKENS tokens per encoder-decoder, past bucketed vs
    compiled per length: compiles and calls of all its sessions."""
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM, ORTModelForSpeechSeq2Seq

    import rkort

    rkort.install()
    rows = []
    for family, merged in (("t5", False), ("bart", False), ("bart", True), ("whisper", False)):
        name = f"{family}{' (merged decoder)' if merged else ''}"
        log(f"  seq2seq: {name}")
        with contextlib.redirect_stdout(io.StringIO()):
            path = build_seq2seq(tmp / f"s2s-{family}-{merged}", family, merged=merged)
        cls = ORTModelForSpeechSeq2Seq if family == "whisper" else ORTModelForSeq2SeqLM
        if family == "whisper":
            feats = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32)
            feed = {"input_features": torch.from_numpy(feats)}
        else:
            ids = torch.tensor([[5, 17, 33, 2, 9, 1]])
            feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        kw = {
            "max_new_tokens": SEQ2SEQ_TOKENS,
            "min_new_tokens": SEQ2SEQ_TOKENS,
            "do_sample": False,
        }
        cpu = cls.from_pretrained(path, use_cache=True)
        start = time.perf_counter()
        want = cpu.generate(**feed, **kw)
        cpu_s = time.perf_counter() - start
        for label, extra in (
            ("past bucketed", {}),
            ("past per length (before)", {"exact_dims": "past_decoder_sequence_length"}),
        ):
            options = {"cache_dir": str(tmp / f"c-{family}-{merged}-{label[:6]}"), **extra}
            npu = cls.from_pretrained(
                path, use_cache=True, provider="RKNN", provider_options=options
            )
            got = npu.generate(**feed, **kw)
            start = time.perf_counter()
            npu.generate(**feed, **kw)
            again_s = time.perf_counter() - start
            parts = [
                rkort.session_stats(getattr(npu, p).session)
                for p in ("encoder", "decoder", "decoder_with_past")
                if getattr(npu, p, None) is not None
            ]
            rows.append(
                [
                    name,
                    label,
                    sum(s["compiles"] for s in parts),
                    sum(s["npu_calls"] for s in parts),
                    sum(s["cpu_calls"] for s in parts),
                    "yes" if np.array_equal(got, want) else "NO",
                    ratio(again_s, cpu_s),
                ]
            )
    return rows


def main() -> None:
    sections = []
    with tempfile.TemporaryDirectory(prefix="rkort-bench-decoding-") as tmp:
        private_default_cache(Path(tmp))
        os.environ["HF_HUB_OFFLINE"] = "1"
        for kind, title in (
            ("gpt2", "GPT-2 (4 layers, 256 wide)"),
            ("llama", "Llama-style (4 layers, 256 wide, GQA)"),
        ):
            log(f"{kind}: export")
            with contextlib.redirect_stdout(io.StringIO()):
                onnx_dir = build_decoder(Path(tmp) / kind, kind, layers=4, width=256)
            cache = Path(tmp) / f"cache-{kind}"
            gen = generation_rows(onnx_dir, cache)
            log(f"{kind}: one decode step side by side")
            steps, cos = step_rows(onnx_dir, cache)
            share = npu_share(onnx_dir)
            sections.append(
                f"### {title}\n\n"
                f"Greedy generate(), {PROMPT}-token prompt, {NEW_TOKENS} new tokens, empty cache:\n\n"
                + md_table(
                    [
                        "run",
                        "compiles",
                        "NPU calls",
                        "CPU calls",
                        "CPU's tokens",
                        "time s",
                        "again vs CPU",
                    ],
                    gen,
                )
                + f"\n\nOne decode step (past {STEP_PAST} padded to 16), {CALLS} calls each, "
                "interleaved; median ms:\n\n"
                + md_table(["runner", "median ms", "vs raw toolkit", "rkort overhead"], steps)
                + f"\n\nOutputs of that step vs onnxruntime: min cosine {cos:.5f}. "
                f"NPU share of a decode step's FLOPs (rkort inspect): {share}."
            )
        log("encoder-decoders")
        sections.append(
            "### Encoder-decoders (optimum's ORTModelForSeq2SeqLM / ORTModelForSpeechSeq2Seq)\n\n"
            f"Greedy generate() of {SEQ2SEQ_TOKENS} tokens, twice, empty cache; compiles and "
            "calls of all the model's sessions (encoder and decoders) over both generations:\n\n"
            + md_table(
                [
                    "model",
                    "run",
                    "compiles",
                    "NPU calls",
                    "CPU calls",
                    "CPU's tokens",
                    "again vs CPU",
                ],
                seq2seq_rows(Path(tmp)),
            )
        )
    publish(
        "decoding",
        "Decoders with a KV cache: generate() through rkort",
        [
            "Target rk3588, the toolkit's simulator (fp16) in rkort's worker process; the raw "
            "toolkit runs its simulator in the benchmark's own process (no process boundary). "
            "Time on the simulator says nothing of a board's NPU: what transfers is the count of "
            "compiles and calls and rkort's overhead per call.",
            *sections,
        ],
    )


if __name__ == "__main__":
    main()
