"""What to tell a user about a shape the cache lacks: the `rkort warmup` command that adds it,
with the shapes already warmed, for the session's target and build options."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from .buckets import ShapePolicy
from .options import RKNNOptions

Signature = tuple[tuple[int, ...], ...]


def warmup_command(
    model: Path,
    options: RKNNOptions,
    policy: ShapePolicy,
    input_names: Sequence[str],
    signature: Signature | None,
) -> str:
    """The `rkort warmup` command that adds ``signature`` (None: the model with its default
    shapes) to the warmed ones."""
    words = ["rkort", "warmup", str(model), "--target", options.target]
    if options.quantized_dtype:
        words += ["--dtype", options.quantized_dtype]
        if options.dataset:
            words += ["--dataset", str(options.dataset)]
    if options.cpu_ops:
        words += ["--cpu-ops", ",".join(options.cpu_ops)]
    padded = policy.padded_symbols
    if signature is None or not padded or policy.exact:
        if signature is not None:
            for name, shape in zip(input_names, signature):
                words += ["--shape", f"{name}={'x'.join(map(str, shape))}"]
        return shlex.join(words)
    known = [*(policy.allowed or []), signature]
    for symbol in padded:
        sizes = sorted({policy.size_of(s, symbol) for s in known})
        flag = "--buckets" if policy.kind[symbol] == "sequence" else "--batch-buckets"
        words += [flag, ",".join(map(str, sizes))]
    return shlex.join(words)
