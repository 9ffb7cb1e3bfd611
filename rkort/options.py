"""The RKNNExecutionProvider's options: parsed from onnxruntime's str->str provider options."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import InvalidArgument, ort_error

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
    "0_1_2": 7,
    "all": 0xFFFF,
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

KNOWN = {
    "target": "SoC to compile for (rk3588, rk3576, rk3568, rk3566, rk3562, ...); default: the board's own SoC, rk3588 on a host",
    "dtype": "fp16 (default) or a quantized dtype: w8a8, w8a16, w16a16i_dfp, w4a16 (needs 'dataset')",
    "dataset": "calibration dataset file for quantized builds (one sample a line, space-separated .npy paths)",
    "core_mask": "NPU cores on a board: auto (default), 0, 1, 2, 0_1, 0_1_2, all, or the integer mask",
    "cache_dir": "where compiled blobs are kept (default: $RKORT_CACHE_DIR or the user cache dir)",
    "device_id": "run on a board attached over adb, by its adb device id",
    "fallback": "1 (default): fall back to the next provider when RKNN cannot run the model; 0: raise instead",
    "optimization_level": "rknn-toolkit2 optimization level 0-3 (default 3)",
    "progress": "1/0: force the compile progress bar on or off (default: on when stderr is a terminal)",
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
    raw: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> RKNNOptions:
        """Validate onnxruntime-normalized options; unknown keys and bad values raise InvalidArgument."""
        from .platform import SUPPORTED_TARGETS, default_target

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
        if quantized and not dataset:
            raise _bad(
                "dtype", raw["dtype"], "a quantized build needs a calibration 'dataset' option"
            )
        if dataset and not os.path.isfile(dataset):
            raise _bad("dataset", dataset, "no such file")
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
        level = 3
        if "optimization_level" in raw:
            try:
                level = int(raw["optimization_level"])
            except ValueError:
                level = -1
            if level not in (0, 1, 2, 3):
                raise _bad("optimization_level", raw["optimization_level"], "expected 0, 1, 2 or 3")
        return cls(
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
