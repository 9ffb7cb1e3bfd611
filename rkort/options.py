"""The RKNNExecutionProvider's options: parsed from onnxruntime's str->str provider options."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import InvalidArgument, ort_error
from .platform import SUPPORTED_TARGETS, cores_of, default_target

PROVIDER = "RKNNExecutionProvider"
ALIASES = ("RKNN", "RKNNExecutionProvider")

# rknn-toolkit2's quantized dtypes, and the float build ("fp16").
_DTYPES = {
    "fp16": None,
    "float16": None,
    "w8a8": "w8a8",
    "w8a16": "w8a16",
    "w16a16i_dfp": "w16a16i_dfp",
    "w4a16": "w4a16",
}
_CORE_MASKS = {
    "auto": 0,
    "0": 1,
    "1": 2,
    "2": 4,
    "0_1": 3,
    "0_2": 5,
    "1_2": 6,
    "0_1_2": 7,
    "all": 0xFFFF,
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

KNOWN = {
    "target": "SoC to compile for (rk3588, rk3576, rk3568, rk3566, rk3562, ...); default: the board's own SoC, rk3588 on a host",
    "dtype": "fp16 (default) or a quantized dtype: w8a8, w8a16, w16a16i_dfp, w4a16 (needs 'dataset')",
    "dataset": "calibration dataset file for quantized builds (one sample a line, space-separated .npy paths)",
    "core_mask": "NPU cores a session may use: auto (default: all of the SoC's), 0, 1, 2, 0_1, 1_2, 0_1_2, all, or the integer mask",
    "contexts": "contexts per compiled model: auto (default: one per allowed core, opened when calls overlap) or a number (1: one context on all the allowed cores)",
    "memory_budget": "bytes of compiled models a session keeps loaded, e.g. 2G (default: a quarter of the RAM, at most 4G)",
    "cache_dir": "where compiled blobs are kept (default: $RKORT_CACHE_DIR or the user cache dir)",
    "device_id": "run on a board attached over adb, by its adb device id",
    "fallback": "1 (default): fall back to the next provider when RKNN cannot run the model; 0: raise instead",
    "optimization_level": "rknn-toolkit2 optimization level 0-3 (default 3)",
    "progress": "1/0: force the compile progress bar on or off (default: on when stderr is a terminal)",
    "buckets": "sequence-length buckets, e.g. 16,32,64,128 (default: powers of two from 16 up to the model's maximum length, at most 512)",
    "batch_buckets": "batch-size buckets, e.g. 1,2,4,8 (the default); larger batches run in chunks",
    "pad_values": "pad value per input, e.g. input_ids=1 (default 0; masks are always padded with 0)",
    "exact_dims": "dynamic dims (by symbol, comma-separated) to compile per observed size instead of padding",
    "oversize": "error (default): an input longer than the largest bucket is an error; cpu: run it on the CPU",
    "shape_mode": "buckets (default): one blob per bucket shape; dynamic: one multi-shape blob holding every bucket",
    "cpu_ops": "op types to run on the CPU, comma-separated (e.g. Softmax,Gather)",
    "cpu_nodes": "node names to run on the CPU, comma-separated",
    "max_live_shapes": "compiled shapes kept open at once (default 16, within memory_budget; the least recently used is closed)",
    "calibration": "calibration data for a quantized dtype: a folder of .npz files (one feed each, input name -> array, any valid shape), or 'recorded' (the feeds record_inputs kept)",
    "calibration_text": "calibration data for a tokenizer model: a text file, one sample a line (with 'tokenizer')",
    "tokenizer": "the tokenizer folder (Hugging Face) that turns calibration_text into feeds",
    "record_inputs": "N: keep the first N feeds of this model in the cache (private) for calibration=recorded (default 0)",
    "quant_algorithm": "rknn-toolkit2's quantized_algorithm: normal (default), mmse, kl_divergence",
    "quant_method": "rknn-toolkit2's quantized_method: channel (default), layer",
    "min_cosine": "a quantized build whose outputs are less similar than this to onnxruntime's (cosine) falls back to hybrid, then fp16 (default 0.99)",
    "record_shapes": "1: record the input shapes this model sees (shapes only, never data) for `rkort buckets` (default 0)",
    "remote_cache": "an fsspec URL (s3://bucket/prefix, gs://..., file:///..., https://...) to fetch blobs from on a local miss (default: $RKORT_REMOTE_CACHE)",
    "remote_write": "1: publish blobs built here to the remote cache (default 0)",
}


def _bad(key: str, value: str, why: str) -> Exception:
    return ort_error(InvalidArgument, f"{PROVIDER} option {key}={value!r} is invalid: {why}")


def _flag(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise _bad(key, value, "expected 1 or 0")


def _count(key: str, value: str) -> int | None:
    if value.strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise _bad(key, value, "expected auto or a positive integer")
    return n


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(key: str, value: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", value.lower())
    if not m:
        raise _bad(key, value, "expected a size such as 512M or 2G")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


@dataclass(frozen=True)
class RKNNOptions:
    """Parsed provider options; ``raw`` keeps the user's str->str dict as onnxruntime reports it."""

    target: str
    quantized_dtype: str | None = None
    dataset: str | None = None
    core_mask: int = 0
    cache_dir: str | None = None
    device_id: str | None = None
    fallback: bool = True
    optimization_level: int = 3
    progress: bool | None = None
    buckets: tuple[int, ...] | None = None
    batch_buckets: tuple[int, ...] | None = None
    pad_values: dict[str, float] = field(default_factory=dict)
    exact_dims: tuple[str, ...] = ()
    oversize_to_cpu: bool = False
    shape_mode: str = "buckets"
    max_live_shapes: int = 16
    contexts: int | None = None
    memory_budget: int | None = None
    calibration: str | None = None
    calibration_text: str | None = None
    tokenizer: str | None = None
    record_inputs: int = 0
    quant_algorithm: str = "normal"
    quant_method: str = "channel"
    min_cosine: float = 0.99
    record_shapes: bool = False
    remote_cache: str | None = None
    remote_write: bool = False
    cpu_ops: tuple[str, ...] = ()
    cpu_nodes: tuple[str, ...] = ()
    raw: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> RKNNOptions:
        """Validate onnxruntime-normalized options; unknown keys and bad values raise InvalidArgument."""
        raw = {str(k): str(v) for k, v in options.items()}
        unknown = sorted(set(raw) - set(KNOWN))
        if unknown:
            raise ort_error(
                InvalidArgument,
                f"Unknown {PROVIDER} option(s) {unknown}; known options: {sorted(KNOWN)}",
            )
        target = raw.get("target", "").strip().lower() or default_target()
        if target not in SUPPORTED_TARGETS:
            raise _bad("target", raw["target"], f"supported targets are {list(SUPPORTED_TARGETS)}")
        dtype = raw.get("dtype", "fp16").strip().lower()
        if dtype not in _DTYPES:
            raise _bad("dtype", raw["dtype"], f"expected one of {sorted(_DTYPES)}")
        quantized = _DTYPES[dtype]
        dataset = raw.get("dataset") or None
        calibration = raw.get("calibration") or None
        calibration_text = raw.get("calibration_text") or None
        tokenizer = raw.get("tokenizer") or None
        if quantized and not (dataset or calibration or calibration_text):
            raise _bad(
                "dtype",
                raw["dtype"],
                "a quantized build needs calibration data: 'calibration', 'calibration_text' "
                "(with 'tokenizer') or the toolkit's 'dataset' file",
            )
        if dataset and not os.path.isfile(dataset):
            raise _bad("dataset", dataset, "no such file")
        if calibration and calibration != "recorded" and not os.path.isdir(calibration):
            raise _bad("calibration", calibration, "expected a folder of .npz files or 'recorded'")
        if calibration_text and not os.path.isfile(calibration_text):
            raise _bad("calibration_text", calibration_text, "no such file")
        if calibration_text and not tokenizer:
            raise _bad("calibration_text", calibration_text, "it needs the 'tokenizer' option too")
        if tokenizer and not os.path.isdir(tokenizer):
            raise _bad("tokenizer", tokenizer, "expected a tokenizer folder")
        algorithm = raw.get("quant_algorithm", "normal").strip().lower()
        if algorithm not in ("normal", "mmse", "kl_divergence"):
            raise _bad(
                "quant_algorithm", raw["quant_algorithm"], "expected normal, mmse or kl_divergence"
            )
        method = raw.get("quant_method", "channel").strip().lower()
        if method not in ("channel", "layer"):
            raise _bad("quant_method", raw["quant_method"], "expected channel or layer")
        try:
            min_cosine = float(raw.get("min_cosine", "0.99"))
        except ValueError:
            min_cosine = -1.0
        if not 0.0 <= min_cosine <= 1.0:
            raise _bad("min_cosine", raw["min_cosine"], "expected a number from 0 to 1")
        core_mask = 0
        if "core_mask" in raw:
            cm = raw["core_mask"].strip().lower()
            if cm in _CORE_MASKS:
                core_mask = _CORE_MASKS[cm]
            else:
                try:
                    core_mask = int(cm, 0)
                except ValueError:
                    raise _bad(
                        "core_mask",
                        raw["core_mask"],
                        f"expected one of {list(_CORE_MASKS)} or an integer",
                    ) from None
        cores = cores_of(target)
        if core_mask not in (0, 0xFFFF) and core_mask >> cores:
            raise _bad(
                "core_mask",
                raw["core_mask"],
                f"it names NPU cores {target} does not have (it has {cores})",
            )
        level = 3
        if "optimization_level" in raw:
            try:
                level = int(raw["optimization_level"])
            except ValueError:
                level = -1
            if level not in (0, 1, 2, 3):
                raise _bad("optimization_level", raw["optimization_level"], "expected 0, 1, 2 or 3")
        pad_values: dict[str, float] = {}
        for item in filter(None, raw.get("pad_values", "").replace(" ", "").split(",")):
            name, sep, value = item.partition("=")
            try:
                pad_values[name] = float(value)
            except ValueError:
                raise _bad(
                    "pad_values", raw["pad_values"], "expected name=number, e.g. input_ids=1"
                ) from None
            if not sep or not name:
                raise _bad(
                    "pad_values", raw["pad_values"], "expected name=number, e.g. input_ids=1"
                )
        oversize = raw.get("oversize", "error").strip().lower()
        if oversize not in ("error", "cpu"):
            raise _bad("oversize", raw["oversize"], "expected error or cpu")
        shape_mode = raw.get("shape_mode", "buckets").strip().lower()
        if shape_mode not in ("buckets", "dynamic"):
            raise _bad("shape_mode", raw["shape_mode"], "expected buckets or dynamic")
        try:
            live = int(raw.get("max_live_shapes", "16"))
        except ValueError:
            live = 0
        if live < 1:
            raise _bad("max_live_shapes", raw["max_live_shapes"], "expected a positive integer")
        return cls(
            buckets=parse_buckets(raw["buckets"], "buckets") if "buckets" in raw else None,
            batch_buckets=parse_buckets(raw["batch_buckets"], "batch_buckets")
            if "batch_buckets" in raw
            else None,
            pad_values=pad_values,
            exact_dims=tuple(filter(None, raw.get("exact_dims", "").replace(" ", "").split(","))),
            oversize_to_cpu=oversize == "cpu",
            shape_mode=shape_mode,
            max_live_shapes=live,
            contexts=_count("contexts", raw["contexts"]) if "contexts" in raw else None,
            memory_budget=_size("memory_budget", raw["memory_budget"])
            if "memory_budget" in raw
            else None,
            calibration=calibration,
            calibration_text=calibration_text,
            tokenizer=tokenizer,
            record_inputs=_count("record_inputs", raw["record_inputs"]) or 0
            if "record_inputs" in raw and raw["record_inputs"].strip() not in ("0", "")
            else 0,
            quant_algorithm=algorithm,
            quant_method=method,
            min_cosine=min_cosine,
            record_shapes=_flag("record_shapes", raw["record_shapes"])
            if "record_shapes" in raw
            else False,
            remote_cache=raw.get("remote_cache") or None,
            remote_write=_flag("remote_write", raw["remote_write"])
            if "remote_write" in raw
            else False,
            cpu_ops=tuple(filter(None, raw.get("cpu_ops", "").replace(" ", "").split(","))),
            cpu_nodes=tuple(filter(None, raw.get("cpu_nodes", "").replace(" ", "").split(","))),
            target=target,
            quantized_dtype=quantized,
            dataset=dataset,
            core_mask=core_mask,
            cache_dir=raw.get("cache_dir") or None,
            device_id=raw.get("device_id") or None,
            fallback=_flag("fallback", raw["fallback"]) if "fallback" in raw else True,
            optimization_level=level,
            progress=_flag("progress", raw["progress"]) if "progress" in raw else None,
            raw=raw,
        )


def parse_buckets(text: str, what: str) -> tuple[int, ...]:
    """ "16,32,64" -> (16, 32, 64); raises InvalidArgument naming the option."""
    try:
        values = tuple(sorted({int(v) for v in text.replace(" ", "").split(",") if v}))
    except ValueError:
        values = ()
    if not values or values[0] < 1:
        raise ort_error(
            InvalidArgument,
            f"RKNNExecutionProvider option {what}={text!r} is invalid: expected positive integers, e.g. 16,32,64",
        )
    return values
