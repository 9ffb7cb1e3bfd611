"""Decoders with a KV cache on the NPU: optimum's ORTModelForCausalLM (GPT-2 and a Llama-style
model, tiny, random weights, exported here) runs ``generate()`` with ``provider="RKNN"``, greedy
and beam search, and gives the CPU provider's tokens, every step one NPU call of a bounded set of
compiled shapes (the past padded on the left, see rkort.kvcache); warmed with
``rkort warmup --max-new-tokens``, a rehearsed board generates without compiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import rkort
from rkort.integrations.example import build_decoder, build_seq2seq
from rkort.integrations.install import uninstall
from tests.conftest import needs_rknn

pytestmark = needs_rknn


@pytest.fixture(autouse=True)
def _onnxruntime_restored() -> Any:
    """rkort.install() patches onnxruntime for the process: undo it after each test, so a later
    test's onnxruntime is onnxruntime's own."""
    yield
    uninstall()


PROMPT = [[5, 17, 33, 2, 9]]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_decoder(tmp_path_factory.mktemp(request.param), request.param)


def _generate(model: Any, **kw: Any) -> np.ndarray:
    import torch

    ids = torch.tensor(PROMPT)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        **kw,
    )
    return out.numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def test_generate_gives_the_cpu_tokens_one_npu_call_a_step(decoder: Path, tmp_path: Path) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM

    rkort.install()
    cpu = ORTModelForCausalLM.from_pretrained(decoder, use_cache=True)
    npu = ORTModelForCausalLM.from_pretrained(
        decoder,
        use_cache=True,
        provider="RKNN",
        provider_options={"cache_dir": str(tmp_path / "cache")},
    )
    assert npu.session.get_providers()[0] == "RKNNExecutionProvider"
    for kw in ({"num_beams": 1}, {"num_beams": 2}):
        np.testing.assert_array_equal(_generate(npu, **kw), _generate(cpu, **kw))
    stats = rkort.session_stats(npu.session)
    # One call per generated token, each answered by the NPU.
    assert stats["npu_calls"] == 2 * NEW_TOKENS and stats["cpu_calls"] == 0, stats
    # Prompt and steps for batch 1 (greedy) and 2 (two beams): the 5-token prompt padded to 16
    # with an empty past padded to 16, then one token with pasts of 5..16 padded to 16.
    assert stats["compiles"] == 4, stats


def test_padded_steps_match_onnxruntime(decoder: Path, tmp_path: Path) -> None:
    """The logits and the present keys/values of a prompt and of a step with a real past: the
    NPU's, after padding and slicing, are onnxruntime's."""
    path = str(decoder / "model.onnx")
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    sess = rkort.InferenceSession(
        path,
        providers=[
            ("RKNNExecutionProvider", {"cache_dir": str(tmp_path / "cache")}),
            "CPUExecutionProvider",
        ],
    )
    names = [i.name for i in ref.get_inputs()]
    pasts = [n for n in names if n.startswith("past_key_values")]
    heads, dim = (
        ref.get_inputs()[names.index(pasts[0])].shape[1],
        ref.get_inputs()[names.index(pasts[0])].shape[3],
    )
    ids = np.array(PROMPT, np.int64)
    feed: dict[str, np.ndarray] = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        **{n: np.zeros((1, heads, 0, dim), np.float32) for n in pasts},
    }
    if "position_ids" in names:
        feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
    for step in range(2):
        want = ref.run(None, feed)
        got = sess.run(None, feed)
        for w, g in zip(want, got):
            assert w.shape == g.shape
            assert _cosine(w, g) >= 0.999, step
        past_len = want[1].shape[2]
        feed = {
            "input_ids": np.argmax(want[0][:, -1:], axis=-1).astype(np.int64),
            "attention_mask": np.ones((1, past_len + 1), np.int64),
            **dict(zip(pasts, want[1:])),
        }
        if "position_ids" in names:
            feed["position_ids"] = np.array([[past_len]], np.int64)
    stats = rkort.session_stats(sess)
    assert stats["npu_calls"] == 2 and stats["cpu_calls"] == 0, stats


APP = """
import json, sys
import torch
from optimum.onnxruntime import ORTModelForCausalLM
import rkort

model = ORTModelForCausalLM.from_pretrained(sys.argv[1], use_cache=True)
ids = torch.tensor(json.loads(sys.argv[2]))
out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                     max_new_tokens=int(sys.argv[3]), min_new_tokens=int(sys.argv[3]), pad_token_id=0)
with open(sys.argv[4], "w") as f:
    json.dump({"tokens": out.tolist(), "stats": rkort.session_stats(model.session)}, f)
"""


def _rkort(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RKORT_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("RKORT_BOARD", None)
    return subprocess.run(
        [sys.executable, "-m", "rkort", *args], capture_output=True, text=True, env=env, timeout=900
    )


def test_a_warmed_board_generates_without_compiling(tmp_path: Path) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM

    decoder = build_decoder(tmp_path, "gpt2")
    cache = tmp_path / "cache"
    warm = _rkort(
        "warmup",
        str(decoder / "model.onnx"),
        "-q",
        "--buckets",
        "16",
        "--batch-buckets",
        "1",
        "--max-new-tokens",
        str(NEW_TOKENS),
        cache=cache,
    )
    assert warm.returncode == 0, warm.stderr
    app, out = tmp_path / "app.py", tmp_path / "out.json"
    app.write_text(APP)
    done = _rkort(
        "run",
        "--board",
        "rk3588",
        "--",
        sys.executable,
        str(app),
        str(decoder),
        json.dumps(PROMPT),
        str(NEW_TOKENS),
        str(out),
        cache=cache,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    cpu = ORTModelForCausalLM.from_pretrained(
        decoder, use_cache=True, provider="CPUExecutionProvider"
    )
    assert result["tokens"] == _generate(cpu).tolist()
    stats = result["stats"]
    assert stats["compiles"] == 0 and stats["cpu_calls"] == 0, stats
    assert stats["npu_calls"] == NEW_TOKENS and stats["blobs_loaded"] >= 2, stats


def test_warmup_refuses_max_new_tokens_for_a_model_without_a_kv_cache(tmp_path: Path) -> None:
    from tests.models import mlp  # any model without past_key_values inputs

    path = mlp(tmp_path).path
    done = _rkort("warmup", str(path), "--max-new-tokens", "8", cache=tmp_path / "cache")
    assert done.returncode != 0
    assert "--max-new-tokens is for a decoder with a KV cache" in done.stderr


def test_inspect_says_how_the_kv_cache_is_padded(decoder: Path, tmp_path: Path) -> None:
    done = _rkort("inspect", str(decoder / "model.onnx"), cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "dim 'past_sequence_length': past padded to 16," in done.stdout
    assert "padded to buckets on the left (a KV cache)" in done.stdout
    assert "dim 'sequence_length': sequence padded to 1,16," in done.stdout
    assert "dim 'past_sequence_length + sequence_length': total: past + new tokens" in done.stdout


@pytest.fixture(scope="module", params=["t5", "bart", "marian", "whisper"])
def seq2seq(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    return request.param, build_seq2seq(tmp_path_factory.mktemp(request.param), request.param)


def test_seq2seq_generate_gives_the_cpu_tokens(seq2seq: tuple[str, Path], tmp_path: Path) -> None:
    """ORTModelForSeq2SeqLM (T5, BART, Marian) and ORTModelForSpeechSeq2Seq (Whisper): the CPU's
    tokens, greedy and with two beams, every call of encoder and decoders on the NPU. Their
    decoders take no mask over the past: rkort adds one (rkort.selfmask) and buckets the past (2
    compiles: batch 1 and 2). BART, Marian and Whisper also count positions from the past's
    length: rkort feeds them."""
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM, ORTModelForSpeechSeq2Seq

    family, path = seq2seq
    rkort.install()
    cls = ORTModelForSpeechSeq2Seq if family == "whisper" else ORTModelForSeq2SeqLM
    cpu = cls.from_pretrained(path, use_cache=True)
    npu = cls.from_pretrained(
        path, use_cache=True, provider="RKNN", provider_options={"cache_dir": str(tmp_path / "c")}
    )
    if family == "whisper":
        feed = {
            "input_features": torch.from_numpy(
                np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32)
            )
        }
    else:
        ids = torch.tensor([[5, 17, 33, 2, 9, 1]])
        feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for beams in (1, 2):
        kw = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "num_beams": beams}
        np.testing.assert_array_equal(npu.generate(**feed, **kw), cpu.generate(**feed, **kw))
    stats = {
        part: rkort.session_stats(getattr(npu, part).session)
        for part in ("encoder", "decoder", "decoder_with_past")
    }
    for part, s in stats.items():
        assert s["cpu_calls"] == 0 and s["npu_calls"] >= 2, (part, s)
    steps = stats["decoder_with_past"]
    assert steps["npu_calls"] == 18, steps  # 9 steps with a past, for 1 and for 2 beams
    assert steps["compiles"] == 2, steps


SEQ2SEQ_APP = """
import json, sys
import numpy as np
import torch
from optimum.onnxruntime import ORTModelForSeq2SeqLM, ORTModelForSpeechSeq2Seq
import rkort

path, feed, tokens, out = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cls = ORTModelForSpeechSeq2Seq if "input_features" in feed else ORTModelForSeq2SeqLM
model = cls.from_pretrained(path, use_cache=True)
kw = {k: torch.from_numpy(feed[k]) for k in feed.files}
got = model.generate(**kw, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens)
stats = {part: rkort.session_stats(getattr(model, part).session)
         for part in ("encoder", "decoder", "decoder_with_past") if getattr(model, part, None)}
with open(out, "w") as f:
    json.dump({"tokens": got.tolist(), "stats": stats}, f)
"""


def _seq2seq_feed(family: str) -> dict[str, np.ndarray]:
    if family == "whisper":
        features = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32)
        return {"input_features": features}
    ids = np.array([[5, 17, 33, 2, 9, 1]], np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


@pytest.mark.parametrize(
    ("family", "merged"),
    [("bart", False), ("bart", True), ("whisper", False)],
    ids=["bart", "bart-merged", "whisper"],
)
def test_a_warmed_board_runs_an_encoder_decoder_without_compiling(
    tmp_path: Path, family: str, merged: bool
) -> None:
    """`rkort warmup DIR --max-new-tokens N` warms an optimum export's files (the decoder
    without a past at the start token, the one with a past at every past bucket, through rkort's
    masked copy with its positions input; for a merged decoder, each branch of its If on
    use_cache_branch the same way; Whisper's encoder length read from its encoder); a rehearsed
    rk3588 then generates the CPU's tokens with no compile and every call on the NPU."""
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM, ORTModelForSpeechSeq2Seq

    model = build_seq2seq(tmp_path, family, merged=merged)
    cache = tmp_path / "cache"
    flags = ["--buckets", "16", "--batch-buckets", "1", "--max-new-tokens", str(NEW_TOKENS)]
    warm = _rkort("warmup", str(model), "-q", *flags, cache=cache)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.count("1 compiled, 0 already in the cache") == 3, warm.stdout  # one each
    if merged:
        assert "branch T of decoder_model_merged.onnx:" in warm.stdout, warm.stdout
    if family == "bart" and not merged:  # rkort inspect: what sessions run, the past bucketed
        shapes = ["input_ids=1x1", "past_key_values.0.decoder.key=1x4x16x16"]
        seen = _rkort(
            "inspect",
            str(model / "decoder_with_past_model.onnx"),
            *[a for s in shapes for a in ("--shape", s)],
            cache=cache,
        )
        assert seen.returncode == 0, seen.stderr
        assert "dim 'past_decoder_sequence_length': past padded to 16," in seen.stdout
        assert "rkort_attention_mask=1x17, rkort_positions=1" in seen.stdout
        assert "sessions run rkort's copy" in seen.stdout
    feed = _seq2seq_feed(family)
    app, fed, out = tmp_path / "app.py", tmp_path / "feed.npz", tmp_path / "out.json"
    app.write_text(SEQ2SEQ_APP)
    np.savez(fed, **feed)
    args = [str(app), str(model), str(fed), str(NEW_TOKENS), str(out)]
    done = _rkort("run", "--board", "rk3588", "--", sys.executable, *args, cache=cache)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    cls = ORTModelForSpeechSeq2Seq if family == "whisper" else ORTModelForSeq2SeqLM
    cpu = cls.from_pretrained(model, use_cache=True)
    kw = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    want = cpu.generate(**{k: torch.from_numpy(v) for k, v in feed.items()}, **kw)
    assert result["tokens"] == want.tolist()
    for part, stats in result["stats"].items():
        assert stats["compiles"] == 0 and stats["cpu_calls"] == 0, (part, stats)
        assert stats["npu_calls"] >= 1, (part, stats)
    steps = result["stats"]["decoder" if merged else "decoder_with_past"]
    # the first token comes from the decoder without a past (a merged one: its F branch)
    assert steps["npu_calls"] == (NEW_TOKENS if merged else NEW_TOKENS - 1), steps
