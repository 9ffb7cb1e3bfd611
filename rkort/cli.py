"""The ``rkort`` command: warm the cache, look after it, and tell what this machine can run."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform as _platform
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_AGES = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(Exception):
    """A mistake on the command line, reported without a traceback."""


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME=1x128`` -> ("NAME", (1, 128))."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims.strip()):
        raise argparse.ArgumentTypeError(
            f"expected NAME=DIMxDIM..., e.g. input_ids=1x128, got {text!r}"
        )
    return name, tuple(int(d) for d in dims.strip().split("x"))


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 500M or 2G, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"expected an age such as 12h or 30d, got {text!r}")
    return float(m.group(1)) * _AGES[m.group(2) or "s"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cache(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .cache import Cache

    return Cache(args.cache_dir)


def cmd_warmup(args: argparse.Namespace) -> int:
    import onnxruntime

    from .compiler import BuildSpec, CompileError
    from .engine import (
        Unsupported,
        bucket_specs,
        compile_to_cache,
        make_policy,
        make_program,
        plan_spec,
    )
    from .model import ModelSource
    from .options import RKNNOptions

    raw = {"dtype": args.dtype, "optimization_level": str(args.optimization_level)}
    for key in (
        "cpu_ops",
        "target",
        "dataset",
        "cache_dir",
        "buckets",
        "batch_buckets",
        "shape_mode",
        "exact_dims",
    ):
        if getattr(args, key, None):
            raw[key] = getattr(args, key)
    options = RKNNOptions.parse(raw)
    # onnxruntime reads and checks the model first: its errors are the ones the session gives.
    sess = onnxruntime.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    model = ModelSource(args.model)
    specs: list[BuildSpec]
    try:
        if args.shape:
            specs = [plan_spec(model, inputs, outputs, options, dict(args.shape))]
        else:
            policy = make_policy(model, inputs, outputs, options)
            specs = bucket_specs(model, inputs, outputs, options, policy)
            if not specs:
                exact = [s for s, k in policy.kind.items() if k == "exact"]
                raise UsageError(
                    f"dims {exact} are compiled per observed size, not padded to buckets; "
                    "give each dynamic input a --shape NAME=DIMxDIM"
                )
    except (Unsupported, ValueError) as e:
        raise UsageError(f"{e}; give each dynamic input a --shape NAME=DIMxDIM") from None
    cache = _cache(args)
    counts = {"compiled": 0, "cached": 0}
    progress = None if not args.quiet else False

    def compile_one(spec: BuildSpec) -> None:
        started = time.monotonic()
        entry, built = compile_to_cache(model, spec, cache, progress=progress)
        shapes_text = ", ".join(
            f"{n}={'x'.join(map(str, s))}" for n, s in zip(spec.input_names, spec.input_shapes)
        )
        if spec.dynamic_input:
            shapes_text = f"{len(spec.dynamic_input)} shapes up to {shapes_text}"
        part = (
            "" if Path(spec.model_path) == model.path else f" segment {Path(spec.model_path).stem}"
        )
        what = f"{args.model}{part} for {spec.target} ({spec.quantized_dtype or 'fp16'}; {shapes_text})"
        if built:
            counts["compiled"] += 1
            print(
                f"compiled {what} in {time.monotonic() - started:.1f} s -> {entry.blob_path} ({_human(entry.size)})"
            )
        else:
            counts["cached"] += 1
            print(f"already in the cache: {what}")

    try:
        if options.shape_mode == "dynamic" and specs and specs[0].dynamic_input:
            for spec in specs:
                compile_one(spec)
        else:
            # The same plan a session makes: NPU segments compiled, CPU segments left to onnxruntime.
            from .backends.cpu import open_cpu

            def open_npu(spec: BuildSpec):  # type: ignore[no-untyped-def]
                compile_one(spec)
                return open_cpu(spec)

            from . import placement

            segmented = []
            for spec in specs:
                shapes = dict(zip(spec.input_names, spec.input_shapes))
                lowered, _ = placement.lower_opset(model.proto)
                planned = placement.plan(
                    lowered,
                    options.target,
                    [*options.cpu_ops, *options.cpu_nodes],
                    input_shapes=shapes,
                )
                devices = [seg.device for seg in planned.segments]
                if lowered is model.proto and devices == ["npu"]:
                    compile_one(spec)  # the whole model is one blob: the spec a session uses
                else:
                    segmented.append(spec)
            # Segments are written out as ONNX files only for models with CPU parts.
            with (
                tempfile.TemporaryDirectory(prefix="rkort-warmup-")
                if segmented
                else contextlib.nullcontext("") as tmp
            ):
                for spec in segmented:
                    shapes = dict(zip(spec.input_names, spec.input_shapes))
                    program = make_program(model, tmp, shapes, open_npu, options)
                    npu = len(program.npu_segments)
                    program.close()
                    if not npu:
                        print(
                            f"rkort warmup: no part of {args.model} runs on the NPU for {options.target}",
                            file=sys.stderr,
                        )
                        return 1
    except CompileError as e:
        print(f"rkort warmup: could not compile {args.model}: {e}", file=sys.stderr)
        return 1
    compiled, cached = counts["compiled"], counts["cached"]
    print(f"{compiled} compiled, {cached} already in the cache")
    return 0


def _entry_row(e: Any) -> dict[str, Any]:
    return {
        "key": e.key,
        "model": e.meta.get("model"),
        "target": e.meta.get("target"),
        "dtype": e.meta.get("dtype"),
        "inputs": e.meta.get("inputs"),
        "toolkit": e.meta.get("toolkit"),
        "size": e.size,
        "created": e.created,
        "last_used": e.last_used,
        "blob": str(e.blob_path),
    }


def cmd_cache(args: argparse.Namespace) -> int:
    cache = _cache(args)
    if args.action == "list":
        rows = [
            _entry_row(e) for e in sorted(cache.entries(), key=lambda e: e.last_used, reverse=True)
        ]
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print(f"the cache at {cache.root} is empty")
            return 0
        for r in rows:
            inputs = ", ".join(
                f"{n}={'x'.join(map(str, s))}" for n, s in (r["inputs"] or {}).items()
            )
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"]))
            print(
                f"{r['key'][:12]}  {r['target'] or '?':7} {r['dtype'] or '?':8} {_human(r['size']):>10}  used {used}  {r['model']}  [{inputs}]"
            )
        return 0
    if args.action == "info":
        info = cache.info()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(
                f"cache: {info['root']}\nentries: {info['entries']}\nsize: {_human(info['bytes'])}"
            )
        return 0
    if args.action == "clear":
        n = cache.clear()
        print(f"removed {n} entr{'y' if n == 1 else 'ies'} from {cache.root}")
        return 0
    if args.max_size is None and args.older_than is None:
        raise UsageError("prune needs --max-size and/or --older-than")
    removed = cache.prune(max_bytes=args.max_size, max_age=args.older_than)
    freed = sum(e.size for e in removed)
    print(
        f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, freed {_human(freed)}"
    )
    return 0


def environment() -> dict[str, Any]:
    """What this machine is and which RKNN pieces it has."""
    import onnxruntime

    from . import __version__
    from .compiler import toolkit_version
    from .platform import (
        board_soc,
        default_target,
        is_board,
        librknnrt_version,
        npu_driver_version,
        toolkit_lite_version,
    )

    board = is_board()
    tk, lite, rt = toolkit_version(), toolkit_lite_version(), librknnrt_version()
    notes = []
    compatible = True
    if board:
        if rt is None:
            compatible = False
            notes.append(
                "no librknnrt.so found: install the board runtime (librknnrt) from Rockchip's SDK"
            )
        for name, v in (("rknn-toolkit-lite2", lite), ("rknn-toolkit2", tk)):
            if v and rt and _version_tuple(rt) < _version_tuple(v):
                compatible = False
                notes.append(
                    f"librknnrt {rt} is older than {name} {v}: blobs it makes will be refused ('Invalid RKNN model version'); update librknnrt"
                )
        if lite is None and tk is None:
            compatible = False
            notes.append(
                "neither rknn-toolkit-lite2 nor rknn-toolkit2 is installed: pip install 'rkort[board]'"
            )
    else:
        if tk is None:
            compatible = False
            notes.append(
                "rknn-toolkit2 is not installed: nothing can be compiled or simulated here"
            )
        else:
            notes.append(f"host: blobs compiled here need librknnrt >= {tk} on the board")
    return {
        "machine": "board" if board else "host",
        "arch": _platform.machine(),
        "soc": board_soc(),
        "default_target": default_target(),
        "npu_driver": npu_driver_version(),
        "librknnrt": rt,
        "rknn_toolkit2": tk,
        "rknn_toolkit_lite2": lite,
        "onnxruntime": onnxruntime.__version__,
        "rkort": __version__,
        "python": _platform.python_version(),
        "compatible": compatible,
        "notes": notes,
    }


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def cmd_inspect(args: argparse.Namespace) -> int:
    import onnxruntime

    from .inspect_report import build_report, format_text
    from .platform import default_target

    # onnxruntime reads and checks the model first: its errors are the ones the session gives.
    onnxruntime.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    force = [x for x in (args.cpu_ops or "").split(",") + (args.cpu_nodes or "").split(",") if x]
    try:
        report = build_report(
            args.model, (args.target or default_target()).lower(), force, dict(args.shape or [])
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    for k, v in env.items():
        if k == "notes":
            continue
        print(
            f"{k:20} {'yes' if v is True else 'no' if v is False else v if v is not None else '-'}"
        )
    for note in env["notes"]:
        print(f"note: {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="rkort", description="ONNX models on Rockchip NPUs, the onnxruntime way."
    )
    p.add_argument("--version", action="version", version=f"rkort {__version__}")
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more (twice: the toolkit's own output)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("warmup", help="compile a model into the cache ahead of time")
    w.add_argument("model", help="an ONNX file")
    w.add_argument(
        "--target",
        help="rk3588, rk3576, rk3568, rk3566, rk3562, ... (default: this board's SoC, rk3588 on a host)",
    )
    w.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        metavar="NAME=DIMxDIM",
        help="static shape for an input with dynamic dims (repeatable)",
    )
    w.add_argument(
        "--dtype",
        default="fp16",
        help="fp16 (default), or w8a8/w8a16/w16a16i_dfp/w4a16 with --dataset",
    )
    w.add_argument(
        "--buckets",
        help="sequence-length buckets to compile, e.g. 32,64,128 (default: the session's)",
    )
    w.add_argument(
        "--batch-buckets",
        dest="batch_buckets",
        help="batch-size buckets, e.g. 1,4 (default: the session's, 1,2,4,8)",
    )
    w.add_argument(
        "--shape-mode",
        dest="shape_mode",
        choices=("buckets", "dynamic"),
        help="one blob per bucket (default) or one multi-shape blob",
    )
    w.add_argument("--cpu-ops", dest="cpu_ops", help="op types to keep on the CPU, comma-separated")
    w.add_argument("--dataset", help="calibration dataset file for a quantized build")
    w.add_argument("--optimization-level", type=int, default=3, choices=(0, 1, 2, 3))
    w.add_argument("--cache-dir", help="default: $RKORT_CACHE_DIR or the user cache dir")
    w.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_warmup)

    c = sub.add_parser("cache", help="list, inspect, clear or prune the compiled-blob cache")
    c.add_argument("action", choices=("list", "info", "clear", "prune"))
    c.add_argument("--cache-dir", help="default: $RKORT_CACHE_DIR or the user cache dir")
    c.add_argument("--json", action="store_true")
    c.add_argument(
        "--max-size",
        type=parse_size,
        help="prune: keep the most recently used entries within this size (e.g. 2G)",
    )
    c.add_argument(
        "--older-than", type=parse_age, help="prune: remove entries unused for this long (e.g. 30d)"
    )
    c.set_defaults(func=cmd_cache)

    e = sub.add_parser(
        "env", help="host or board, SoC, NPU driver and runtime versions, and whether they fit"
    )
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_env)

    from .integrations.run import add_run_parser

    add_run_parser(sub)
    i = sub.add_parser(
        "inspect",
        help="which node of a model runs where (NPU or CPU) and why, before anything runs",
    )
    i.add_argument("model", help="an ONNX file")
    i.add_argument(
        "--target",
        help="rk3588, rk3576, rk3568, rk3566, rk3562, ... (default: this board's SoC, rk3588 on a host)",
    )
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--cpu-ops", help="op types to force onto the CPU, comma-separated")
    i.add_argument("--cpu-nodes", help="node names to force onto the CPU, comma-separated")
    i.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        metavar="NAME=DIMxDIM",
        help="static shape for an input with dynamic dims (repeatable; default: those dims are 1)",
    )
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (
        logging.WARNING
        if args.verbose == 0
        else logging.INFO
        if args.verbose == 1
        else logging.DEBUG
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        logging.getLogger("rkort.toolkit").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"rkort {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - onnxruntime's and the cache's errors, without a traceback
        from .cache import CacheError

        known = type(e).__module__.startswith("onnxruntime") or isinstance(e, (CacheError, OSError))
        if not known:
            raise
        print(f"rkort {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
