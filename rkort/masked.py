"""Decoders given a mask over their past (:mod:`rkort.selfmask`): the run side. The session of a
decoder exported without one runs, on RKNN, a copy with the mask (made once, kept in the cache by
its content, so warmup, sessions and boards build and find the same blobs) and feeds it a mask
of ones; its KV cache is then bucketed like any (:mod:`rkort.kvcache`)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx

from .cache import Cache, make_key
from .engine import RKNNEngine
from .files import write_atomic
from .front import EngineFront
from .model import ModelSource
from .options import RKNNOptions
from .selfmask import (
    MASK_INPUT,
    POSITIONS_INPUT,
    SelfMask,
    added_inputs,
    needs_mask,
    output_dims,
    with_mask,
)
from .stats import SessionStats

SELFMASK_FORMAT = 2


class MaskArg(NamedTuple):
    """The added input, described as onnxruntime describes its inputs."""

    name: str
    shape: list[Any]
    type: str


def model_mask(model: ModelSource, cache: Cache) -> SelfMask | None:
    """Whether ``model`` needs the mask, and where (kept in the cache: a warm open does not
    parse the model)."""
    body = _record(model, cache)
    if body is not None:
        return body[0]
    mask = needs_mask(model.proto) if not model.external_files else None
    _store(model, cache, mask, None)
    return mask


def masked_file(model: ModelSource, mask: SelfMask, cache: Cache) -> Path:
    """The model with the mask, as a file in the cache named by its content (made once: its
    name is kept in the model's record, so a warm open neither parses nor rewrites the model)."""
    directory = cache.model_dir("masked", model.content_hash(cache))
    body = _record(model, cache)
    if body is not None and body[1] is not None and (directory / body[1]).is_file():
        return directory / body[1]
    data = with_mask(model.proto, mask).SerializeToString()
    path = directory / f"{model.path.stem}-masked-{hashlib.sha256(data).hexdigest()[:16]}.onnx"
    if not path.is_file():
        write_atomic(path, data)
    _store(model, cache, mask, path.name)
    return path


def _key(model_hash: str) -> str:
    return make_key({"kind": "selfmask", "selfmask_format": SELFMASK_FORMAT, "model": model_hash})


def _record(model: ModelSource, cache: Cache) -> tuple[SelfMask | None, str | None] | None:
    """(the mask, the masked file's name) the cache holds for ``model``, or None."""
    model_hash = model.content_hash(cache)
    body = cache.records.get(model_hash, _key(model_hash))
    if not isinstance(body, dict) or "mask" not in body:
        return None
    found, name = body["mask"], body.get("file")
    try:
        mask = (
            None if found is None else SelfMask(**{**found, "softmaxes": tuple(found["softmaxes"])})
        )
    except TypeError:
        return None
    return mask, name if isinstance(name, str) and "/" not in name else None


def _store(model: ModelSource, cache: Cache, mask: SelfMask | None, name: str | None) -> None:
    model_hash = model.content_hash(cache)
    body = {"mask": None if mask is None else dataclasses.asdict(mask), "file": name}
    cache.records.put(model_hash, _key(model_hash), body)


def masked_source(model: ModelSource, cache: Cache) -> ModelSource | None:
    """The masked copy of ``model`` when it needs one (what ``rkort warmup`` compiles)."""
    mask = model_mask(model, cache)
    return None if mask is None else ModelSource(masked_file(model, mask, cache))


class MaskedEngine(EngineFront):
    """Runs a decoder through its masked copy: the user's inputs and a mask of ones."""

    def __init__(
        self,
        model: ModelSource,
        mask: SelfMask,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        options: RKNNOptions,
        stats: SessionStats | None = None,
        cpu_options: Any = None,
        cache: Cache | None = None,
    ) -> None:
        super().__init__(model, inputs, outputs, options, cache)
        self.mask = mask
        path = masked_file(model, mask, self.cache)
        added = [MaskArg(MASK_INPUT, [mask.batch, mask.total], "tensor(int64)")]
        if mask.positions:
            kind = onnx.helper.tensor_dtype_to_np_dtype(mask.positions_type).name
            added.append(MaskArg(POSITIONS_INPUT, [mask.sequence], f"tensor({kind})"))
        renamed = [MaskArg(o.name, output_dims(o.name, o.shape, mask), o.type) for o in outputs]
        self._picks = (
            self.input_names.index(mask.ids_input),
            self.input_names.index(mask.past_input),
        )
        self._engine = RKNNEngine(
            ModelSource(path), [*inputs, *added], renamed, options, stats, cpu_options, self.cache
        )
        self.parts = self._engine.parts
        self.npu_only = self._engine.npu_only
        model.drop_graph()

    def run(
        self,
        arrays: Sequence[np.ndarray],
        profile: dict[str, Any] | None = None,
        on_segment: Any = None,
        stop: Callable[[], None] | None = None,
    ) -> list[np.ndarray]:
        """Outputs in model order (see :meth:`RKNNEngine.run`)."""
        added = added_inputs(arrays, *self._picks, self.mask)
        return self._engine.run([*arrays, *added], profile, on_segment, stop)

    def close(self) -> None:
        self._engine.close()
