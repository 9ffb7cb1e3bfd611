"""The ``rkort`` command: warm the cache, look after it, inspect a model, run an unchanged app, and
tell what this machine can run. One module per subcommand; this one parses and dispatches."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..cache import CacheError
from ..version import __version__
from .buckets import add_buckets_parser
from .cache_cmd import cmd_cache
from .check import add_check_parser
from .common import UsageError, parse_age, parse_dim, parse_shape, parse_size
from .env import cmd_env
from .inspect import cmd_inspect
from .run import add_run_parser
from .warmup import add_calibration_flags, add_traffic_flags, cmd_warmup

__all__ = ["UsageError", "build_parser", "main", "parse_age", "parse_shape", "parse_size"]


def build_parser() -> argparse.ArgumentParser:
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
    w.add_argument(
        "model",
        help="an ONNX file, or a directory of them (an optimum export: each file, "
        "--max-new-tokens applying to the decoders with a KV cache)",
    )
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
        "--dim",
        action="append",
        type=parse_dim,
        metavar="NAME=SIZE",
        help="with --max-new-tokens: the size of a dynamic dim compiled per size (repeatable; "
        "an optimum export's encoder length is read from its encoder)",
    )
    w.add_argument(
        "--dtype",
        default="fp16",
        help="fp16 (default), or w8a8/w8a16/w16a16i_dfp/w4a16 with --calibration, "
        "--calibration-text or --dataset",
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
    add_traffic_flags(w)
    add_calibration_flags(w)
    w.set_defaults(func=cmd_warmup)

    c = sub.add_parser(
        "cache", help="list, inspect, clear, prune, export or import the compiled-blob cache"
    )
    c.add_argument("action", choices=("list", "info", "clear", "prune", "export", "import"))
    c.add_argument("path", nargs="?", help="export: the bundle to write; import: the one to read")
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
    c.add_argument("--target", help="export: only the entries built for this SoC (e.g. rk3588)")
    c.add_argument(
        "--model",
        action="append",
        help="export: only the entries of this model (its file, name or content hash; repeatable)",
    )
    c.set_defaults(func=cmd_cache)

    e = sub.add_parser(
        "env", help="host or board, SoC, NPU driver and runtime versions, and whether they fit"
    )
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_env)

    add_run_parser(sub)
    add_buckets_parser(sub)
    add_check_parser(sub)
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
        "--cache-dir", help="where trial-build records are read (default: the user cache dir)"
    )
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
        known = type(e).__module__.startswith("onnxruntime") or isinstance(e, (CacheError, OSError))
        if not known:
            raise
        print(f"rkort {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
