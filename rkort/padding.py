"""Padding proven, not guessed: before a dynamic dim of a model is padded to buckets, onnxruntime
runs a probe of the model on the CPU once unpadded and once padded, and the valid part of every
output must agree. A dim that fails (or whose probe cannot run) is compiled per observed size
instead, with the reason kept for ``rkort inspect``. A float mask that padding with 0 would
unmask (an additive mask: 0 keeps, a large negative value drops) gets the pad value that keeps
the result. The verdict is stored with the model in the cache, so the probe runs once per model
and cache (and a board reads it from the warmed cache)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx

from .buckets import ShapePolicy, is_mask, named_dims
from .cache import Cache
from .cache.entry import make_key
from .feed import dtype_of
from .model import ModelSource
from .options import RKNNOptions
from .shapes import output_dims_traced

log = logging.getLogger("rkort")

PROOF_FORMAT = 1
#: The pad value tried for a float mask after 0: BERT's additive mask fill, finite in fp16.
ADDITIVE_MASK_FILL = -10000.0
#: Relative error (to the output's largest magnitude) below which a padded result agrees.
_TOLERANCE = 1e-3
#: Probe lengths: short enough to be cheap, long enough for a real bucket to pad them.
_PROBE = {"sequence": 5, "batch": 3, "past": 3}


def make_policy(
    model: ModelSource,
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    options: RKNNOptions,
    cache: Cache | None = None,
    session_options: Any = None,
) -> ShapePolicy:
    """The shape rules a session with these options follows (which dims pad to which buckets):
    a dim is padded only where the padding probe proves it harmless (its verdict kept in
    ``cache``, or in the default cache)."""
    if not _named(inputs, outputs):
        cache = cache if cache is not None else Cache(options.cache_dir)
        outputs = traced_outputs(model, inputs, outputs, cache)
    policy = ShapePolicy(
        model,
        inputs,
        outputs,
        sequence_buckets=options.buckets,
        batch_buckets=options.batch_buckets,
        pad_values=options.pad_values,
        exact_dims=options.exact_dims,
    )
    if policy.padded_symbols:
        cache = cache if cache is not None else Cache(options.cache_dir)
        prove_padding(policy, model, inputs, cache, model.content_hash(cache), session_options)
    return policy


class _Output(NamedTuple):
    name: str
    shape: list[Any]
    type: str


def _named(inputs: Sequence[Any], outputs: Sequence[Any]) -> bool:
    """Whether every output dim is a size or an input's dim, as declared."""
    symbols = {d for dims in named_dims(inputs) for d in dims if isinstance(d, str)}
    return all(isinstance(d, int) or d in symbols for o in outputs for d in o.shape)


def traced_outputs(
    model: ModelSource, inputs: Sequence[Any], outputs: Sequence[Any], cache: Cache
) -> Sequence[Any]:
    """``outputs`` with the dims their declarations leave unnamed or unknown traced to input
    dims (:func:`rkort.shapes.output_dims_traced`, which plans the graph), kept in the cache so
    a warm open does not trace again."""
    if _named(inputs, outputs):
        return outputs
    model_hash = model.content_hash(cache)
    key = make_key({"kind": "output_dims", "output_dims_format": 1, "model": model_hash})
    body = cache.records.get(model_hash, key)
    dims = body.get("dims") if isinstance(body, Mapping) else None
    if not isinstance(dims, list) or len(dims) != len(outputs):
        named = dict(zip((i.name for i in inputs), named_dims(inputs)))
        dims = output_dims_traced(model, named, [list(o.shape) for o in outputs])
        cache.records.put(model_hash, key, {"dims": dims})
    return [_Output(o.name, list(d), o.type) for o, d in zip(outputs, dims)]


def prove_padding(
    policy: ShapePolicy,
    model: Any,
    inputs: Sequence[Any],
    cache: Cache | None,
    model_hash: str | None,
    session_options: Any = None,
) -> None:
    """Keep padded only the dims of ``policy`` whose padding the probe proves harmless (the rest
    become exact, with a reason), and set the pad values the proof chose. ``model`` is a
    :class:`~rkort.model.ModelSource`; ``inputs`` the session's input args (name, type)."""
    candidates = {s: policy.kind[s] for s in policy.padded_symbols}
    if not candidates:
        return
    user_pads = dict(policy.given_pad_values)
    key = None
    if cache is not None and model_hash is not None:
        key = make_key(
            {
                "kind": "padding",
                "proof_format": PROOF_FORMAT,
                "model": model_hash,
                "candidates": candidates,
                "pad_values": user_pads,
            }
        )
        body = cache.records.get(model_hash, key)
        if _apply(policy, body):
            return
    body = _prove(policy, model, inputs, session_options)
    _apply(policy, body)
    if key is not None and cache is not None and model_hash is not None:
        cache.records.put(model_hash, key, body)


def _apply(policy: ShapePolicy, body: Mapping[str, Any] | None) -> bool:
    if not isinstance(body, Mapping) or not isinstance(body.get("dims"), Mapping):
        return False
    dims, pads = body["dims"], body.get("pad_values", {})
    if set(dims) != set(policy.padded_symbols) or not isinstance(pads, Mapping):
        return False
    for name, value in pads.items():
        if name in policy.input_names:
            policy.pad_values[policy.input_names.index(name)] = float(value)
    for symbol, verdict in dims.items():
        if verdict.get("padded"):
            policy.reasons[symbol] = str(verdict.get("reason", ""))
        else:
            policy.compile_exactly(symbol, str(verdict.get("reason", "")))
    return True


def _prove(
    policy: ShapePolicy, model: Any, inputs: Sequence[Any], session_options: Any
) -> dict[str, Any]:
    """Run the probes: {"dims": {symbol: {"padded", "reason"}}, "pad_values": {input: value}}."""
    dims: dict[str, dict[str, Any]] = {}
    pads: dict[str, float] = {}
    try:
        session = _cpu_session(model, session_options)
        proto = model.proto
    except Exception as e:  # noqa: BLE001 - no probe, no padding
        reason = f"the padding probe could not load the model on the CPU ({type(e).__name__}: {e})"
        return {"dims": {s: {"padded": False, "reason": reason} for s in policy.padded_symbols}}
    dtypes = [dtype_of(i.type) for i in inputs]
    actual = {s: _PROBE.get(policy.kind[s], 1) for s in policy.padded_symbols}
    for symbol in policy.input_symbols():
        actual.setdefault(symbol, 1)
    if policy.kv is not None:
        actual[policy.kv.total] = policy.kv.derived(actual)
    rng = np.random.default_rng(0)
    try:
        feed = _probe_feed(policy, proto, dtypes, actual, rng)
        reference = session.run(None, dict(zip(policy.input_names, feed)), _quiet())
    except Exception as e:  # noqa: BLE001 - an input the probe could not make up
        reason = f"the padding probe could not run the model ({type(e).__name__}: {e})"
        return {"dims": {s: {"padded": False, "reason": reason} for s in policy.padded_symbols}}
    for symbol in policy.padded_symbols:
        size = actual[symbol]
        padded = next((b for b in policy.buckets[symbol] if b > size), size + 3)
        masks = [
            i
            for i, (name, dims, dt) in enumerate(zip(policy.input_names, policy.input_dims, dtypes))
            if symbol in dims
            and is_mask(name)
            and dt is not None
            and dt.kind == "f"
            and name not in policy.given_pad_values
        ]
        tries: list[dict[int, float]] = [{}]
        if masks:
            tries.append(dict.fromkeys(masks, ADDITIVE_MASK_FILL))
        verdict: dict[str, Any] = {}
        for values in tries:
            error = _padded_error(policy, session, feed, reference, symbol, actual, padded, values)
            if error is None:
                verdict = {"padded": True, "reason": _why_padded(policy, symbol, padded)}
                for i, value in values.items():
                    name = policy.input_names[i]
                    pads[name] = value
                    verdict["reason"] += f"; mask '{name}' padded with {value:g} (additive)"
                break
            verdict = {"padded": False, "reason": error}
        dims[symbol] = verdict
        if not verdict["padded"]:
            log.info(
                "%s: dim '%s' is compiled per size, not padded: %s",
                model.path.name,
                symbol,
                verdict["reason"],
            )
    return {"dims": dims, "pad_values": pads}


def _padded_error(
    policy: ShapePolicy,
    session: Any,
    feed: list[np.ndarray],
    reference: list[np.ndarray],
    symbol: str,
    actual: dict[str, int],
    padded_size: int,
    values: Mapping[int, float],
) -> str | None:
    """None when padding ``symbol`` from ``actual[symbol]`` to ``padded_size`` keeps the valid
    part of every output; else why not."""
    saved = list(policy.pad_values)
    try:
        for i, value in values.items():
            policy.pad_values[i] = value
        signature = policy.signature_for({**actual, symbol: padded_size})
        padded = policy.pad_to(feed, signature)
    finally:
        policy.pad_values[:] = saved
    try:
        outputs = session.run(None, dict(zip(policy.input_names, padded)), _quiet())
    except Exception as e:  # noqa: BLE001 - a model that refuses the padded shape
        return f"padding '{symbol}' makes onnxruntime fail ({type(e).__name__}: {str(e)[:200]})"
    valid = policy.slice_outputs(outputs, actual, signature)
    names = [o.name for o in session.get_outputs()]
    for name, got, want in zip(names, valid, reference):
        if got.shape != want.shape:
            return (
                f"padding '{symbol}' changes the shape of output '{name}' "
                f"({list(want.shape)} -> {list(got.shape)} after slicing)"
            )
        if want.dtype.kind in "fc":
            scale = float(np.nanmax(np.abs(want))) if want.size else 0.0
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
            same_nan = np.isnan(got) == np.isnan(want)
            err = float(np.nanmax(diff)) / max(scale, 1e-6) if diff.size else 0.0
            if not same_nan.all() or err > _TOLERANCE:
                return (
                    f"padding '{symbol}' changes the valid part of output '{name}' "
                    f"(relative error {err:.2g} on a probe)"
                )
        elif not np.array_equal(got, want):
            return f"padding '{symbol}' changes the valid part of output '{name}' (on a probe)"
    return None


def _why_padded(policy: ShapePolicy, symbol: str, padded: int) -> str:
    what = policy.kind[symbol]
    where = " on the left (a KV cache)" if what == "past" else ""
    return (
        f"{what} padded to buckets{where}: a probe padded from {_PROBE[what]} to {padded} gave "
        "onnxruntime's unpadded result"
    )


def _probe_feed(
    policy: ShapePolicy,
    proto: onnx.ModelProto,
    dtypes: Sequence[np.dtype | None],
    sizes: Mapping[str, int],
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Made-up inputs of the probe sizes: masks all ones, ids within the tables they index,
    positions counting up, floats standard normal."""
    bounds = _index_bounds(proto)
    feed = []
    for name, dims, dt in zip(policy.input_names, policy.input_dims, dtypes):
        if dt is None:
            raise ValueError(f"input '{name}' is not a tensor")
        shape = tuple(d if isinstance(d, int) else sizes[d] for d in dims)
        low = name.lower()
        if is_mask(name) or dt.kind == "b":
            a = np.ones(shape, dt)
        elif dt.kind in "iu":
            if "position" in low and shape:
                a = np.broadcast_to(np.arange(shape[-1]), shape).astype(dt)
            else:
                high = max(2, min(bounds.get(name, 2), 1000))
                a = rng.integers(0, high, size=shape).astype(dt)
        else:
            a = rng.standard_normal(shape).astype(dt)
        feed.append(np.ascontiguousarray(a))
    return feed


def _index_bounds(proto: onnx.ModelProto) -> dict[str, int]:
    """For inputs used as Gather indices into an initializer table (directly or through a
    Cast): the table's length."""
    tables = {t.name: int(t.dims[0]) for t in proto.graph.initializer if t.dims}
    alias: dict[str, str] = {i.name: i.name for i in proto.graph.input}
    bounds: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in ("Cast", "Identity", "Unsqueeze", "Reshape") and node.input:
            if node.input[0] in alias:
                for out in node.output:
                    alias[out] = alias[node.input[0]]
        elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in alias:
            table = tables.get(node.input[0])
            if table:
                name = alias[node.input[1]]
                bounds[name] = min(bounds.get(name, table), table)
    return bounds


def _quiet() -> Any:
    """Run options that keep onnxruntime's own error log of a probe that fails (a verdict, not
    the user's error) off stderr."""
    from onnxruntime import RunOptions

    options = RunOptions()
    options.log_severity_level = 4
    return options


def _cpu_session(model: Any, session_options: Any) -> Any:
    # onnxruntime's own class, even when rkort.install() has put rkort's in its place.
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    return InferenceSession(
        model.onnxruntime_source(), session_options, providers=["CPUExecutionProvider"]
    )
