"""``rkort cache list|info|clear|prune|export|import``: look after the compiled-blob cache and carry
it to boards in bundles."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ..cache import Cache, export_bundle, import_bundle
from ..model import ModelSource
from .common import UsageError
from .common import human as _human


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
    cache = Cache(args.cache_dir)
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
    if args.action in ("export", "import"):
        return _bundle(cache, args)
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


def _bundle(cache: Cache, args: argparse.Namespace) -> int:
    if not args.path:
        raise UsageError(
            f"{args.action} needs a bundle path, e.g. rkort cache {args.action} fleet.tar"
        )
    if args.action == "import":
        done = import_bundle(cache, args.path)
        print(
            f"imported {done.entries} entr{'y' if done.entries == 1 else 'ies'} "
            f"({done.present} already here) and {done.records} program record(s) into {cache.root}"
        )
        return 0
    models: list[str] = []
    for model in args.model or ():
        models.append(model)
        if os.path.isfile(model):  # also by content, wherever the entries say it was
            models.append(ModelSource(model).content_hash(cache))
    made = export_bundle(cache, args.path, target=args.target, models=models)
    for key, why in made.skipped:
        print(f"skipped {key[:12]}: {why}", file=sys.stderr)
    print(
        f"exported {made.entries} entr{'y' if made.entries == 1 else 'ies'} "
        f"({_human(made.bytes)}) and {made.records} program record(s) to {made.path}"
    )
    return 0
