"""``rkort warmup``: compile a model into the cache ahead of time, exactly as its sessions will run
it (the same decision per signature, trial builds included, recorded for boards).

With ``--from-traffic``, the signatures are the ones fitted to the shapes its sessions recorded
(``rkort buckets``); once they are compiled they are stored as the model's ``fitted.json``, which
its sessions then use as their buckets (on a board every warmed shape is one anyway)."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..branching import branch_files, model_branching, model_inputs
from ..buckets import ShapePolicy
from ..cache import Cache
from ..engine import make_policy, multi_shape_part
from ..errors import InvalidArgument, Unsupported, ort_error
from ..masked import masked_source
from ..model import ModelSource
from ..options import RKNNOptions
from ..parts import blob_meta, build_blob
from ..planner import Part, Planner
from ..shapes import signature_of
from ..spec import CompileError, dtype_refusal
from ..traffic import write_fitted
from .buckets import DEFAULT_MAX_SHAPES, NoTraffic, TrafficFit, fit_traffic
from .common import UsageError
from .common import human as _human

_OPTION_FLAGS = (
    "cpu_ops",
    "target",
    "dataset",
    "cache_dir",
    "buckets",
    "batch_buckets",
    "shape_mode",
    "exact_dims",
    "calibration",
    "calibration_text",
    "tokenizer",
    "quant_algorithm",
    "quant_method",
    "min_cosine",
)


def cmd_warmup(args: argparse.Namespace) -> int:
    if not Path(args.model).is_dir():
        return _warmup(args)
    # An exported model's directory (optimum's encoder, decoder and decoder with past): each of
    # its ONNX files, --max-new-tokens applying to those with a KV cache.
    files = sorted(Path(args.model).glob("*.onnx"))
    if not files:
        raise UsageError(f"{args.model} is a directory with no .onnx file")
    if args.shape or getattr(args, "from_traffic", False):
        raise UsageError("--shape and --from-traffic name one model's inputs: give an ONNX file")
    dims = {**encoder_dims(files), **dict(args.dim or ())}
    for path in files:
        print(f"{path.name}:")
        one = argparse.Namespace(**{**vars(args), "model": str(path), "dim": list(dims.items())})
        code = _warmup(one, directory=True)
        if code:
            return code
    return 0


def _warmup(args: argparse.Namespace, directory: bool = False) -> int:
    """Warm one ONNX file; ``directory`` when it is one part of a generation (a file of an
    exported directory, or a branch), where --max-new-tokens applies only to a KV cache."""
    from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

    raw = {"dtype": args.dtype, "optimization_level": str(args.optimization_level)}
    for key in _OPTION_FLAGS:
        if getattr(args, key, None):
            raw[key] = getattr(args, key)
    options = parse_options(raw)
    # onnxruntime reads and checks the model first: its errors are the ones the session gives.
    sess = InferenceSession(args.model, providers=["CPUExecutionProvider"])
    split = _branches(args)
    if split is not None:
        return split
    model = ModelSource(args.model)
    masked = masked_source(model, Cache(args.cache_dir))
    if masked is not None:  # a decoder given a mask over its past: its sessions run the copy
        model = masked
        sess = InferenceSession(str(masked.path), providers=["CPUExecutionProvider"])
    planner = Planner(model, options, Cache(args.cache_dir))
    fitted: TrafficFit | None = None
    try:
        try:
            if getattr(args, "from_traffic", False):
                if (
                    args.shape
                    or args.buckets
                    or args.batch_buckets
                    or getattr(args, "max_new_tokens", None)
                ):
                    raise UsageError(
                        "--from-traffic chooses the shapes: leave out --shape, --buckets and "
                        "--batch-buckets"
                    )
                try:
                    fitted = fit_traffic(args.model, options, planner.cache, args.max_shapes)
                except NoTraffic as e:
                    print(f"rkort warmup: {e}", file=sys.stderr)
                    return 1
                names = [i.name for i in sess.get_inputs()]
                signatures = [dict(zip(names, s)) for s in fitted.signatures]
            elif args.shape:
                signatures = [signature_of(model.proto, dict(args.shape))]
            else:
                policy = make_policy(model, sess.get_inputs(), sess.get_outputs(), options)
                names = [i.name for i in sess.get_inputs()]
                wanted = policy.signatures()
                if getattr(args, "max_new_tokens", None) is not None and (
                    policy.kv is not None or not directory
                ):
                    # A decoder given rkort's mask is a seq2seq one's with-past half: its
                    # prompt runs in the decoder without a past.
                    wanted = generation_signatures(
                        policy, args.max_new_tokens, masked is None, dict(args.dim or ())
                    )
                elif getattr(args, "max_new_tokens", None) is not None:
                    wanted = first_token_signatures(policy, dict(args.dim or ()))
                signatures = [dict(zip(names, s)) for s in wanted]
                if not signatures:
                    exact = [s for s, k in policy.kind.items() if k == "exact"]
                    raise UsageError(
                        f"dims {exact} are compiled per observed size, not padded to buckets; "
                        "give each dynamic input a --shape NAME=DIMxDIM"
                    )
        except (Unsupported, ValueError) as e:
            raise UsageError(f"{e}; give each dynamic input a --shape NAME=DIMxDIM") from None
        report = _Report(args, planner, progress=None if not args.quiet else False)
        try:
            if options.shape_mode == "dynamic" and len(signatures) > 1:
                part = multi_shape_part(planner, signatures)
                if part is not None:
                    planner.ensure_file(planner.decide(signatures[-1])[0], part)
                    report.compile(part, signatures[-1])
                    return report.done()
            for sig in signatures:
                decision, _ = planner.decide(sig, build=report.builder(sig))
                for part in decision.npu_parts:
                    if part.key not in report.seen:
                        planner.ensure_file(decision, part)
                        report.compile(part, decision.signature)
                if not decision.npu_parts:
                    why = "; ".join(decision.cpu_reasons[:5])
                    print(
                        f"rkort warmup: no part of {args.model} runs on the NPU for "
                        f"{options.target}: {why}",
                        file=sys.stderr,
                    )
                    return 1
        except CompileError as e:
            print(f"rkort warmup: could not compile {args.model}: {e}", file=sys.stderr)
            return 1
        if fitted is not None:
            _store_fitted(planner, fitted, args.max_shapes)
        return report.done()
    finally:
        planner.close()


def encoder_dims(files: Sequence[Path]) -> dict[str, int]:
    """In an optimum export, the size of each decoder dim the encoder's output fixes: its
    ``last_hidden_state`` is the decoders' ``encoder_hidden_states`` (Whisper's encoder always
    gives 1500 positions, which its decoders name ``encoder_sequence_length``)."""
    import onnx

    from ..shapes import declared_types

    def declared(path: Path, name: str) -> tuple[Any, ...]:
        found = declared_types(onnx.load(str(path), load_external_data=False)).get(name)
        return tuple(found.shape or ()) if found is not None else ()

    encoder = next((f for f in files if f.name == "encoder_model.onnx"), None)
    if encoder is None:
        return {}
    given = declared(encoder, "last_hidden_state")
    sizes: dict[str, int] = {}
    for f in files:
        if f != encoder:
            for d, size in zip(declared(f, "encoder_hidden_states"), given):
                if isinstance(d, str) and isinstance(size, int):
                    sizes[d] = size
    return sizes


def _branches(args: argparse.Namespace) -> int | None:
    """A model with Ifs decided at run time (a merged decoder's ``use_cache_branch``) runs each
    branch as a program of its own: warm each branch model (as its sessions write and find them
    in the cache), or None for a model without such Ifs."""
    model, cache = ModelSource(args.model), Cache(args.cache_dir)
    split = model_branching(model, cache)
    if not split.ifs:
        return None
    if getattr(args, "from_traffic", False):
        raise UsageError("--from-traffic does not warm a model whose Ifs are decided at run time")
    for label, path in branch_files(model, split, cache).items():
        if label == "conditions":
            continue  # runs on the CPU
        names = model_inputs(path)
        shapes = [(n, dims) for n, dims in args.shape or () if n in names]
        print(f"branch {label} of {Path(args.model).name}:")
        branch = argparse.Namespace(**{**vars(args), "model": str(path), "shape": shapes})
        code = _warmup(branch, directory=True)
        if code:
            return code
    return 0


def first_token_signatures(
    policy: ShapePolicy, fixed: Mapping[str, int] | None = None
) -> list[tuple[tuple[int, ...], ...]]:
    """The shapes the decoder of an encoder-decoder without a past runs in a generation: its
    first step, the start token alone (its ids' length compiled exactly at 1), at every bucket of
    its padded dims, its other exact dims at their ``fixed`` sizes."""
    ids = [
        dims[1]
        for name, dims in zip(policy.input_names, policy.input_dims)
        if name in ("input_ids", "decoder_input_ids") and len(dims) == 2
    ]
    sizes = {**dict.fromkeys(ids, 1), **(fixed or {})}
    exact = {s for s, k in policy.kind.items() if k == "exact"}
    if not exact:
        return policy.signatures()
    _need_sizes(exact, sizes)
    combos: list[dict[str, int]] = [{s: sizes[s] for s in exact}]
    for s in policy.padded_symbols:
        combos = [{**c, s: b} for c in combos for b in policy.buckets[s]]
    return [policy.signature_for(c) for c in combos]


def _need_sizes(exact: set[str], sizes: Mapping[str, int]) -> None:
    missing = sorted(exact - set(sizes))
    if missing:
        raise UsageError(
            f"dims {missing} are compiled per observed size, not padded to buckets; give each "
            "its size with --dim NAME=SIZE"
        )


def generation_signatures(
    policy: ShapePolicy,
    max_new_tokens: int,
    prompts: bool = True,
    fixed: Mapping[str, int] | None = None,
) -> list[tuple[tuple[int, ...], ...]]:
    """The shapes a decoder's generations of up to ``max_new_tokens`` need, for every prompt
    bucket and batch bucket: the prompt with an empty past (padded to the smallest past bucket),
    then one new token with each past bucket up to the longest prompt plus the new tokens.
    Without ``prompts`` (a decoder that always has a past: an encoder-decoder's, whose first
    token runs in its decoder without one), only the one-token steps. Other exact dims (an
    encoder's fixed length) at their ``fixed`` sizes."""
    kv = policy.kv
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    exact = {s for s, k in policy.kind.items() if k == "exact"}
    if kv is None or {kv.past, kv.sequence} & exact:
        raise UsageError(
            "--max-new-tokens is for a decoder with a KV cache whose dims are padded "
            "(past_key_values.* inputs and an attention mask over past + new tokens)"
        )
    _need_sizes(exact, fixed or {})
    pinned = {s: (fixed or {})[s] for s in exact}
    lengths = [b for b in policy.buckets[kv.sequence] if b > 1] if prompts else []
    pasts = policy.buckets[kv.past]
    longest = (lengths[-1] if lengths else 1) + max_new_tokens - 1
    reach = next((p for p in pasts if p >= longest), pasts[-1])
    steps = [(b, pasts[0]) for b in lengths] + [(1, p) for p in pasts if p <= reach]
    # Every other padded dim (the batch, an encoder's length) at each of its buckets.
    others = [s for s in policy.padded_symbols if s not in (kv.past, kv.sequence)]
    found = []
    for combo in itertools.product(*(policy.buckets[s] for s in others)):
        for new, past in steps:
            sizes = {kv.sequence: new, kv.past: past, **dict(zip(others, combo)), **pinned}
            found.append(policy.signature_for(sizes))
    return list(dict.fromkeys(found))


def _store_fitted(planner: Planner, fitted: TrafficFit, max_shapes: int) -> None:
    """Keep the compiled fitted signatures as the model's buckets, and say so."""
    info = {
        "max_shapes": max_shapes,
        "samples": fitted.samples,
        "buckets": fitted.buckets,
        "waste": round(fitted.waste, 4),
        "current_waste": round(fitted.current_waste, 4),
        "exact": fitted.exact,
    }
    path = write_fitted(planner.cache, planner.model_hash, fitted.inputs, fitted.signatures, info)
    sizes = "; ".join(f"{s} {','.join(map(str, b))}" for s, b in fitted.buckets.items())
    print(
        f"fitted {len(fitted.signatures)} shape(s) to {fitted.samples} recorded call(s)"
        + (f" ({sizes})" if sizes else "")
        + f": padding waste {fitted.waste:.2f}x, against {fitted.current_waste:.2f}x with the "
        f"default buckets; sessions of this model use them from now on ({path})"
    )


def parse_options(raw: dict[str, str]) -> RKNNOptions:
    """The provider options of these flags; a quantized dtype the target does not take is
    onnxruntime's InvalidArgument, as for a session."""
    options = RKNNOptions.parse(raw)
    if options.quantized_dtype:
        refusal = dtype_refusal(options.quantized_dtype, options.target)
        if refusal:
            raise ort_error(
                InvalidArgument,
                f"RKNNExecutionProvider option dtype={raw['dtype']!r} is invalid: {refusal}",
            )
    return options


def add_calibration_flags(parser: argparse.ArgumentParser) -> None:
    """The calibration of a quantized build (``--dtype w8a8`` ...), on warmup and check."""
    parser.add_argument(
        "--calibration",
        help="a folder of .npz feeds (input name -> array, any valid shape), or 'recorded' (the "
        "feeds record_inputs kept)",
    )
    parser.add_argument(
        "--calibration-text",
        dest="calibration_text",
        help="a text file, one sample a line (with --tokenizer)",
    )
    parser.add_argument("--tokenizer", help="the tokenizer folder for --calibration-text")
    parser.add_argument(
        "--quant-algorithm",
        dest="quant_algorithm",
        choices=("normal", "mmse", "kl_divergence"),
        help="rknn-toolkit2's quantized_algorithm (default normal)",
    )
    parser.add_argument(
        "--quant-method",
        dest="quant_method",
        choices=("channel", "layer"),
        help="rknn-toolkit2's quantized_method (default channel)",
    )
    parser.add_argument(
        "--min-cosine",
        dest="min_cosine",
        help="below this cosine to onnxruntime a quantized build falls back to hybrid, then fp16 "
        "(default 0.99)",
    )


def add_traffic_flags(parser: argparse.ArgumentParser) -> None:
    """``--from-traffic`` and ``--max-shapes`` on the warmup parser."""
    parser.add_argument(
        "--from-traffic",
        dest="from_traffic",
        action="store_true",
        help="compile the shapes fitted to what its sessions recorded (record_shapes=1; see "
        "`rkort buckets`), and make them the model's buckets",
    )
    parser.add_argument(
        "--max-shapes",
        dest="max_shapes",
        type=int,
        default=DEFAULT_MAX_SHAPES,
        metavar="K",
        help=f"with --from-traffic: shapes to fit (default {DEFAULT_MAX_SHAPES})",
    )
    parser.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int,
        metavar="N",
        help="a decoder with a KV cache: compile the shapes generate() needs for prompts up to "
        "the largest of --buckets and up to N new tokens (no compile during generation)",
    )


def quantization_line(meta: Mapping[str, Any]) -> str | None:
    """What a quantized blob's cache entry says it measured, in one line (None for a float
    blob): ``w8a8 + 44 float16 layers: cosine 0.9938 min / 0.9942 mean to onnxruntime on 8
    held-out samples (asked: w8a8, min_cosine 0.99)``."""
    q = meta.get("quantization")
    if not isinstance(q, Mapping):
        return None
    asked = f"asked: {q.get('requested')}, min_cosine {q.get('min_cosine')}"
    if not q.get("measured"):
        return f"{q.get('built')}: not measured against onnxruntime ({asked})"
    cal = q.get("calibration") or {}
    where = (
        f"{cal.get('samples')} calibration samples (none held out)"
        if cal.get("in_sample")
        else f"{cal.get('held_out')} held-out samples"
    )
    return (
        f"{q.get('built')}: cosine {q.get('cosine_min'):.4f} min / {q.get('cosine_mean'):.4f} "
        f"mean to onnxruntime on {where} ({asked})"
    )


class _Report:
    """Compiles NPU parts into the cache and says, per blob, whether it was compiled or found."""

    def __init__(self, args: argparse.Namespace, planner: Planner, progress: bool | None) -> None:
        self.args, self.planner, self.progress = args, planner, progress
        self.compiled = self.cached = 0
        self.seen: set[str] = set()

    def builder(self, signature: Mapping[str, Sequence[int]]) -> Callable[[Part], Any]:
        """The planner's build function for one signature."""
        return lambda part: self.compile(part, signature)

    def compile(self, part: Part, signature: Mapping[str, Sequence[int]]) -> Any:
        spec = part.spec
        assert spec is not None and part.key is not None
        started = time.monotonic()

        def build(dest: Path) -> dict[str, Any]:
            runner, extra = build_blob(self.planner, part, signature, dest, self.progress)
            if runner is not None:
                runner.close()
            return extra

        entry, built = self.planner.cache.get_or_build(
            part.key, build, blob_meta(self.planner, spec, part, signature)
        )
        self.seen.add(part.key)
        shapes = ", ".join(
            f"{n}={'x'.join(map(str, s))}" for n, s in zip(spec.input_names, spec.input_shapes)
        )
        if spec.dynamic_input:
            shapes = f"{len(spec.dynamic_input)} shapes up to {shapes}"
        what_part = "" if part.source == "model" else f" segment {Path(spec.model_path).stem}"
        what = f"{self.args.model}{what_part} for {spec.target} ({spec.quantized_dtype or 'fp16'}; {shapes})"
        if built:
            self.compiled += 1
            took = time.monotonic() - started
            print(f"compiled {what} in {took:.1f} s -> {entry.blob_path} ({_human(entry.size)})")
        else:
            self.cached += 1
            print(f"already in the cache: {what}")
        figures = quantization_line(entry.meta)
        if figures:
            print(f"  {figures}")
        return None

    def done(self) -> int:
        print(f"{self.compiled} compiled, {self.cached} already in the cache")
        return 0
