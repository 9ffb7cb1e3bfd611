"""Conformance scenarios on the zoo's real models (the models packages ship, see apps.py), written
like compat/scenarios.py: each call is made on onnxruntime and on rkort, and the outputs, or the
exceptions' types and messages, are compared (compat/test_zoo_conformance.py).

Feeds are made from a seeded generator in the ranges the apps feed (pixels in [0, 1] or
normalised to [-1, 1], audio in [-1, 1], byte values 0-256, token ids). Models whose image sizes
are free get small sizes: each size is a compile on the NPU. Only models whose package is
installed are listed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..scenarios import Call, Scenario
from .apps import APPS, model_paths

Feed = Callable[[np.random.Generator], Any]

#: Scenarios whose RKNN session keeps the CPU today, and the documented reason (a substring of
#: the CPU reason session_stats gives).
DOCUMENTED_CPU = {"zoo_silero_vad": "If"}


def _model(app: str, name: str) -> Callable[[], str]:
    return lambda: str(model_paths(APPS[app])[name])


def _image(*shape: int, low: float = 0.0) -> Feed:
    return lambda rng: rng.uniform(low, 1.0, shape).astype(np.float32)


def _page(height: int, width: int) -> Feed:
    """The OCR app's page of text at this size, normalised as RapidOCR does, with a little
    noise. (On noise alone the detector's map is ~1e-10 everywhere: nothing to compare.)"""

    def feed(rng: np.random.Generator) -> dict[str, Any]:
        from PIL import Image

        from .rapidocr_app import page

        pixels = np.asarray(Image.fromarray(page()).resize((width, height)), np.float32) / 255
        pixels = pixels + rng.normal(0.0, 0.02, pixels.shape)
        x = ((pixels - 0.5) / 0.5).transpose(2, 0, 1)[None]
        return {"x": np.ascontiguousarray(x, np.float32)}

    return feed


def _silero(batch: int, samples: int, sr: Any) -> Feed:
    def feed(rng: np.random.Generator) -> dict[str, Any]:
        t = np.arange(samples) / 16000
        voice = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 4 * t))
        audio = voice + 0.05 * rng.standard_normal((batch, samples))
        return {
            "input": audio.astype(np.float32),
            "state": np.zeros((2, batch, 128), np.float32),
            "sr": sr,
        }

    return feed


def _tokens(batch: int, length: int, pad: int = 0) -> Feed:
    def feed(rng: np.random.Generator) -> dict[str, Any]:
        ids = rng.integers(1000, 29000, (batch, length)).astype(np.int64)
        ids[:, 0], ids[:, -1 - pad] = 101, 102  # [CLS] ... [SEP]
        mask = np.ones((batch, length), np.int64)
        if pad:
            ids[-1, -pad:], mask[-1, -pad:] = 0, 0
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    return feed


def _installed(app: str) -> bool:
    return APPS[app].installed()


def zoo_scenarios() -> list[Scenario]:
    found: list[Scenario] = []
    if _installed("magika"):
        magika = _model("magika", "model.onnx")

        def byte_values(rng: np.random.Generator, rows: int = 1) -> np.ndarray:
            return rng.integers(0, 257, (rows, 2048)).astype(np.int32)

        found.append(
            Scenario(
                "zoo_magika",
                magika,
                [
                    Call("bytes", None, lambda rng: {"bytes": byte_values(rng)}),
                    Call("bytes as a list", None, lambda rng: {"bytes": byte_values(rng).tolist()}),
                    Call("three files", None, lambda rng: {"bytes": byte_values(rng, 3)}),
                    Call(
                        "int64 bytes",
                        None,
                        lambda rng: {"bytes": byte_values(rng).astype(np.int64)},
                    ),
                    Call("too few bytes", None, lambda rng: {"bytes": byte_values(rng)[:, :100]}),
                ],
            )
        )
    if _installed("silero_vad"):
        found.append(
            Scenario(
                "zoo_silero_vad",
                _model("silero_vad", "silero_vad.onnx"),
                [
                    Call("16 kHz chunk", None, _silero(1, 576, np.array(16000, np.int64))),
                    Call("8 kHz chunk", None, _silero(1, 288, np.array(8000, np.int64))),
                    Call("two streams", None, _silero(2, 576, np.array(16000, np.int64))),
                    Call("sr as a 1-d array", None, _silero(1, 576, np.array([16000], np.int64))),
                    Call("sr as int32", None, _silero(1, 576, np.array(16000, np.int32))),
                    Call("state only", ["stateN"], _silero(1, 576, np.array(16000, np.int64))),
                ],
            )
        )
    if _installed("nudenet"):
        found.append(
            Scenario(
                "zoo_nudenet",
                _model("nudenet", "320n.onnx"),
                [
                    Call("image", None, lambda rng: {"images": _image(1, 3, 320, 320)(rng)}),
                    Call("wrong rank", None, lambda rng: {"images": _image(3, 320, 320)(rng)}),
                ],
            )
        )
    if _installed("rapidocr"):
        # Normalised as RapidOCR feeds them: (pixel / 255 - 0.5) / 0.5.
        found += [
            Scenario(
                "zoo_rapidocr_det",
                _model("rapidocr", "ch_PP-OCRv4_det_infer.onnx"),
                [Call("page", None, _page(96, 160))],
            ),
            Scenario(
                "zoo_rapidocr_cls",
                _model("rapidocr", "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
                [Call("lines", None, lambda rng: {"x": _image(2, 3, 48, 192, low=-1.0)(rng)})],
            ),
            Scenario(
                "zoo_rapidocr_rec",
                _model("rapidocr", "ch_PP-OCRv4_rec_infer.onnx"),
                [Call("line", None, lambda rng: {"x": _image(1, 3, 48, 320, low=-1.0)(rng)})],
            ),
        ]
    if _installed("minilm_int8"):
        found.append(
            Scenario(
                "zoo_minilm_int8",
                _model("minilm_int8", "model.onnx"),
                [
                    Call("one sentence", None, _tokens(1, 10)),
                    Call("two sentences, one padded", None, _tokens(2, 14, pad=5)),
                    Call(
                        "missing token_type_ids",
                        None,
                        lambda rng: {
                            k: v for k, v in _tokens(1, 10)(rng).items() if k != "token_type_ids"
                        },
                    ),
                ],
            )
        )
    return found


def model_file(scenario: Scenario) -> str:
    return Path(scenario.model()).name
