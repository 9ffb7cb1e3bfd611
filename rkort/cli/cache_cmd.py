"""``rkort cache list|info|clear|prune``: look after the compiled-blob cache."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ..cache import Cache
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
