"""Calibration data for quantized builds, read as feeds of the model: feeds kept from real traffic
(``record_inputs=N``, the source of ``calibration=recorded``), a folder of .npz feeds
(``calibration``), text and a tokenizer (``calibration_text``, ``tokenizer``), or the toolkit's own
``dataset`` file; and a digest of that data by content for the blobs' cache keys.

    root/calibration/<model hash>/feed-<n>.npz    one feed (input name -> array), private
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cache import Cache
from .feed import dtype_of
from .options import RKNNOptions
from .spec import CalibrationError, dataset_samples

log = logging.getLogger("rkort")


def recorded_dir(cache: Cache, model_hash: str) -> Path:
    return cache.root / "calibration" / model_hash


class InputRecorder:
    """Keeps the first ``limit`` feeds of a model (opt-in: they are real data), in the cache
    directory, private like the cache; never fails a session."""

    def __init__(
        self, cache: Cache, model_hash: str, input_names: Sequence[str], limit: int
    ) -> None:
        self.directory = recorded_dir(cache, model_hash)
        self.cache = cache
        self.input_names = list(input_names)
        self.limit = limit
        self._lock = threading.Lock()
        self._full = False

    def record(self, arrays: Sequence[np.ndarray]) -> None:
        if self._full:
            return
        with self._lock:
            try:
                self.cache._ensure_dirs("calibration")
                self.directory.mkdir(mode=0o700, exist_ok=True)
                for n in range(self.limit):
                    path = self.directory / f"feed-{n:05d}.npz"
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    except FileExistsError:
                        continue
                    with os.fdopen(fd, "wb") as f:
                        np.savez(f, **dict(zip(self.input_names, arrays)))
                    return
                self._full = True
            except OSError as e:
                log.debug("could not keep a calibration feed in %s: %s", self.directory, e)
                self._full = True


def recorded_feeds(cache: Cache, model_hash: str) -> list[dict[str, np.ndarray]]:
    """The feeds ``record_inputs`` kept for a model, in the order they came."""
    feeds = []
    for path in sorted(recorded_dir(cache, model_hash).glob("feed-*.npz")):
        with np.load(path, allow_pickle=False) as data:
            feeds.append({k: data[k] for k in data.files})
    return feeds


# -- the calibration data a quantized build is asked to use ----------------------------------------

#: Files of a tokenizer folder that decide how text becomes ids (weights beside them do not).
_TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json|"
    r"spiece\.model|sentencepiece.*\.model|config\.json)$"
)
_ZERO_INPUTS = ("token_type_ids", "segment_ids")


def source_kind(options: RKNNOptions) -> str | None:
    """Where a quantized build's calibration comes from: "recorded" (record_inputs),
    "folder" (.npz feeds), "text" (a text file and a tokenizer), "dataset" (the toolkit's own
    file); None for a float build."""
    if not options.quantized_dtype:
        return None
    if options.calibration == "recorded":
        return "recorded"
    if options.calibration:
        return "folder"
    if options.calibration_text:
        return "text"
    return "dataset" if options.dataset else None


def source_digest(options: RKNNOptions, cache: Cache, model_hash: Callable[[], str]) -> str | None:
    """A digest of the calibration data by content (every file it reads), for the cache keys of
    the blobs built from it; None for a float build."""
    kind = source_kind(options)
    if kind is None:
        return None
    if kind == "dataset":
        assert options.dataset is not None
        files = [p for sample in dataset_samples(options.dataset) for p in sample]
    elif kind == "text":
        assert options.calibration_text is not None and options.tokenizer is not None
        folder = Path(options.tokenizer)
        files = [options.calibration_text] + sorted(
            str(p) for p in folder.iterdir() if p.is_file() and _TOKENIZER_FILES.match(p.name)
        )
    else:
        folder = (
            recorded_dir(cache, model_hash())
            if kind == "recorded"
            else Path(str(options.calibration))
        )
        files = sorted(str(p) for p in folder.glob("*.npz"))
    h = hashlib.sha256(kind.encode())
    for path in files:
        h.update(b"\n" + os.path.basename(path).encode() + b" ")
        try:
            h.update(cache.hashes.file_digest(path).encode())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()


class CalibrationSource:
    """The calibration feeds of one model as its inputs take them (name -> array, batch and
    sequence as the data has them; a session's padding is applied per shape later).

    ``inputs`` are the model's inputs as onnxruntime describes them (name, shape, type)."""

    def __init__(self, options: RKNNOptions, cache: Cache, model_hash: str, inputs: Sequence[Any]):
        self.kind = source_kind(options)
        self.options = options
        self.names = [i.name for i in inputs]
        self.dtypes = {i.name: dtype_of(i.type) for i in inputs}
        self.shapes = {i.name: list(i.shape) for i in inputs}
        self._cache, self._model_hash = cache, model_hash
        self._feeds: list[dict[str, np.ndarray]] | None = None
        self._lines: list[str] | None = None
        self._tokenizer: Any = None

    def feeds(self, length: int | None = None) -> list[dict[str, np.ndarray]]:
        """Every feed, in the data's order; a text sample tokenized to at most ``length`` tokens
        (the bucket being built: a longer text is cut by the tokenizer, as the tokenizer cuts it
        for a model of that length)."""
        if self.kind == "text":
            return self._text_feeds(length)
        if self._feeds is None:
            self._feeds = [self._checked(f, where) for f, where in self._read()]
            if not self._feeds:
                raise CalibrationError(f"the calibration data ({self.describe()}) holds no feed")
        return self._feeds

    def describe(self) -> str:
        o = self.options
        if self.kind == "recorded":
            return f"the feeds record_inputs kept in {recorded_dir(self._cache, self._model_hash)}"
        if self.kind == "folder":
            return f"calibration={o.calibration}"
        if self.kind == "text":
            return f"calibration_text={o.calibration_text} with tokenizer={o.tokenizer}"
        return f"dataset={o.dataset}"

    def _read(self) -> list[tuple[dict[str, np.ndarray], str]]:
        if self.kind == "dataset":
            assert self.options.dataset is not None
            found = []
            for sample in dataset_samples(self.options.dataset):
                if len(sample) != len(self.names) or not all(p.endswith(".npy") for p in sample):
                    raise CalibrationError(
                        f"dataset={self.options.dataset}: a sample must name one .npy file per "
                        f"input {self.names}, got {sample}"
                    )
                found.append(
                    (
                        {n: np.load(p, allow_pickle=False) for n, p in zip(self.names, sample)},
                        sample[0],
                    )
                )
            return found
        if self.kind == "recorded":
            folder = recorded_dir(self._cache, self._model_hash)
            if not sorted(folder.glob("feed-*.npz")):
                raise CalibrationError(
                    "calibration=recorded, but no feed of this model was recorded in "
                    f"{self._cache.root} (run sessions with record_inputs=N first)"
                )
            paths = sorted(folder.glob("feed-*.npz"))
        else:
            paths = sorted(Path(str(self.options.calibration)).glob("*.npz"))
        found = []
        for path in paths:
            with np.load(path, allow_pickle=False) as data:
                found.append(({k: data[k] for k in data.files}, str(path)))
        return found

    def _checked(self, feed: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        if set(feed) != set(self.names):
            raise CalibrationError(
                f"calibration feed {where} holds {sorted(feed)}; the model's inputs are {self.names}"
            )
        out = {}
        for name in self.names:
            a = np.asarray(feed[name])
            dims = self.shapes[name]
            if a.ndim != len(dims) or any(
                isinstance(d, int) and d != n for d, n in zip(dims, a.shape)
            ):
                raise CalibrationError(
                    f"calibration feed {where}: input {name!r} has shape {list(a.shape)}, which "
                    f"the model's {dims} cannot take"
                )
            dtype = self.dtypes[name]
            out[name] = a.astype(dtype, copy=False) if dtype is not None else a
        return out

    def _text_feeds(self, length: int | None) -> list[dict[str, np.ndarray]]:
        if self._lines is None:
            text = Path(str(self.options.calibration_text)).read_text(encoding="utf-8")
            self._lines = [line.strip() for line in text.splitlines() if line.strip()]
            if not self._lines:
                raise CalibrationError(f"calibration_text={self.options.calibration_text} is empty")
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise CalibrationError(f"calibration_text needs transformers: {e}") from e
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    str(self.options.tokenizer), local_files_only=True
                )
            except (OSError, ValueError) as e:
                raise CalibrationError(
                    f"tokenizer={self.options.tokenizer} cannot be loaded: {e}"
                ) from e
        ids = self.shapes.get("input_ids")
        if ids is None or len(ids) != 2:
            raise CalibrationError(
                f"calibration_text feeds a model whose input_ids is [batch, sequence]; its inputs "
                f"are {self.names}"
            )
        static = ids[1] if isinstance(ids[1], int) else None
        limit = int(static or length or getattr(self._tokenizer, "model_max_length", 512) or 512)
        feeds = []
        for line in self._lines:
            enc = self._tokenizer(
                line,
                truncation=True,
                max_length=min(limit, 1 << 20),
                padding="max_length" if static else False,
                return_tensors="np",
            )
            feed: dict[str, np.ndarray] = {}
            for name in self.names:
                if name in enc:
                    value = np.asarray(enc[name])
                elif name in _ZERO_INPUTS:
                    value = np.zeros_like(np.asarray(enc["input_ids"]))
                elif name == "position_ids":
                    value = np.arange(enc["input_ids"].shape[1])[None, :]
                else:
                    raise CalibrationError(
                        f"the tokenizer gives {sorted(enc)}; the model's input {name!r} is none "
                        "of them"
                    )
                dtype = self.dtypes[name]
                feed[name] = value.astype(dtype) if dtype is not None else value
            feeds.append(feed)
        return feeds
