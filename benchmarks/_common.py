"""Shared helpers for rkort's benchmarks: models built locally, timing, memory, quiet toolkit calls,
and markdown tables. Nothing here asserts a time: the benchmarks only measure and report.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
if str(ROOT) not in sys.path:  # run from a checkout without installing rkort
    sys.path.insert(0, str(ROOT))

OPSET = 17
SEQ = 128
TARGET = "rk3588"

_LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def _cpu_now() -> tuple[float, float, float]:
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process and its reaped
    descendants)."""
    import resource

    import psutil

    t = psutil.cpu_times()
    busy = sum(t) - t.idle - sum(getattr(t, f, 0.0) for f in ("iowait", "guest", "guest_nice"))
    me = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    return time.monotonic(), busy, me


def others_cpu_since(start: tuple[float, float, float]) -> float:
    """Share of all CPUs used by processes other than this one and its (reaped) descendants."""
    wall, busy, me = _cpu_now()
    elapsed = max(1e-9, wall - start[0])
    return max(0.0, (busy - start[1]) - (me - start[2])) / (elapsed * (os.cpu_count() or 1))


_CPU_AT_START = _cpu_now()

#: Set by run_all.py so that every benchmark reuses the same (deterministic) model files.
MODELS_ENV = "RKORT_BENCH_MODELS"


# ---------------------------------------------------------------------------------------------
# Environment and output


def environment() -> list[tuple[str, str]]:
    def ver(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        mem = "?"
    try:
        import rkort

        rkort_version = rkort.__version__
    except Exception:  # noqa: BLE001
        rkort_version = "?"
    return [
        ("CPUs", f"{os.cpu_count()} x {cpu}"),
        ("RAM", mem),
        ("OS", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("Python", platform.python_version()),
        ("rkort", rkort_version),
        ("rknn-toolkit2", ver("rknn-toolkit2")),
        ("onnxruntime", ver("onnxruntime")),
        ("onnx", ver("onnx")),
        ("numpy", ver("numpy")),
        ("torch", ver("torch")),
        ("transformers", ver("transformers")),
        ("target", f"{TARGET} (host simulator)"),
        (
            "load avg (1/5/15 min) at start -> report",
            "/".join(f"{x:.2f}" for x in _LOAD_AT_START)
            + " -> "
            + "/".join(f"{x:.2f}" for x in os.getloadavg()),
        ),
        (
            "other processes' CPU during this benchmark (share of all CPUs, 0% = quiet)",
            f"{others_cpu_since(_CPU_AT_START):.0%}",
        ),
    ]


def env_block() -> str:
    items = "; ".join(f"{k}: {v}" for k, v in environment())
    return f"_{time.strftime('%Y-%m-%d %H:%M:%S')}. {items}_"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(name: str, title: str, sections: Sequence[str]) -> str:
    """Print the report and write it to benchmarks/results/<name>.md."""
    text = f"## {title}\n\n{env_block()}\n\n" + "\n\n".join(s.strip() for s in sections) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    sys.stdout.flush()
    return text


def ms(seconds: float) -> str:
    v = seconds * 1e3
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def secs(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 1 else f"{seconds:.2f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.0f}" if nbytes >= 10 * 2**20 else f"{nbytes / 2**20:.2f}"


def log(msg: str) -> None:
    """Progress to stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


#: A figure of a table row: a number (formatted by the table's ``fmt``) or text kept as it is.
Figure = Union[float, int, str, None]


@dataclass
class Side:
    """One row of a "baseline vs rkort" pair: what it is, its figures, and text columns that
    follow the ratios (who else was busy, say)."""

    what: str
    figures: Sequence[Figure]
    after: Sequence[str] = field(default_factory=tuple)


def pair_rows(
    prefix: Sequence[str],
    baseline: Side,
    rkort: Side,
    fmt: Callable[[float], str] = ms,
    ratios: Sequence[int] = (0, 1),
    missing: str = "n/a",
) -> list[list[str]]:
    """The two rows every benchmark compares with: ``prefix + [what] + figures + ratios +
    after``, the baseline's ratios 1.00x, rkort's its figure ``i`` over the baseline's for each
    ``i`` in ``ratios`` (``missing`` where either is not a number; None figures print so too)."""

    def number(v: Figure) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    rows = []
    for side in (baseline, rkort):
        cells = [*prefix, side.what]
        cells += [
            missing if v is None else fmt(float(v)) if number(v) is not None else str(v)
            for v in side.figures
        ]
        for i in ratios:
            if side is baseline:
                cells.append("1.00x")
                continue
            a, b = number(rkort.figures[i]), number(baseline.figures[i])
            cells.append(ratio(a, b) if a is not None and b is not None else missing)
        rows.append(cells + list(side.after))
    return rows


def busy(result: Mapping[str, Any]) -> str:
    """Other processes' share of the CPUs while a child ran (see :func:`run_child`)."""
    return f"{result['_others_cpu']:.0%}" if "_others_cpu" in result else "?"


# ---------------------------------------------------------------------------------------------
# Measuring


def wait_for_quiet(max_wait: float, busy_percent: float = 30.0) -> float:
    """Wait (at most ``max_wait`` s) until the machine's CPUs are less than ``busy_percent`` busy
    over a 3 s sample (other people's work moves every number here); returns the seconds waited.
    A CPU sample, not the load average, which lags and still counts the previous benchmark."""
    import psutil

    started = time.monotonic()
    announced = False
    while True:
        busy = psutil.cpu_percent(interval=3)
        if busy < busy_percent or time.monotonic() - started >= max_wait:
            return time.monotonic() - started
        if not announced:
            log(f"CPUs {busy:.0f}% busy with other work: waiting up to {max_wait:.0f} s ...")
            announced = True


@dataclass
class Stats:
    median: float
    p90: float
    mean: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        a = np.asarray(samples, dtype=np.float64)
        return cls(float(np.median(a)), float(np.percentile(a, 90)), float(a.mean()), len(a))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "p90": self.p90, "mean": self.mean, "n": self.n}


class Clock:
    """``with Clock() as t: ...`` then ``t.s`` is the block's wall time in seconds."""

    s: float = float("nan")

    def __enter__(self) -> Clock:
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self._t


def time_calls(fn: Callable[[], Any], calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


#: Interleaving: each runner gets calls/ROUNDS calls per round, in turn.
ROUNDS = 20


class Idled:
    """A runner that idles ``gap`` seconds before each call, untimed: the call is timed alone."""

    def __init__(self, fn: Callable[[], Any], gap: float) -> None:
        self.fn, self.gap = fn, gap

    def __call__(self) -> Any:
        return self.fn()

    def timed(self, calls: int) -> list[float]:
        out = []
        for _ in range(calls):
            time.sleep(self.gap)
            t = time.perf_counter()
            self.fn()
            out.append(time.perf_counter() - t)
        return out


def interleave(
    runners: Mapping[str, Callable[[], Any]], calls: int, warmup: int, rounds: int = ROUNDS
) -> dict[str, list[float]]:
    """Per-call times of several runners measured side by side: ``warmup`` untimed calls each,
    then ``rounds`` rounds in which each runner makes calls/rounds timed calls in turn (the order
    reversed every other round), so that drifts of the machine's load hit every runner alike."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    per_round = max(1, calls // rounds)
    for r in range(rounds):
        order = list(runners.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            if isinstance(fn, Idled):
                samples[name] += fn.timed(per_round)
            else:
                samples[name] += time_calls(fn, per_round, 0)
    return samples


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def peak_rss(pid: int | None = None) -> int:
    """Peak resident set size (VmHWM) of a live process, in bytes; this process by default."""
    path = f"/proc/{pid or 'self'}/status"
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if pid is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import psutil

    return psutil.Process(pid).memory_info().rss  # current, not peak: the best left


def rss(pid: int | None = None) -> int:
    """Current resident set size of a live process (this one by default), in bytes."""
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def simulator_workers() -> list[int]:
    """The pids of this process's rkort simulator workers (and of a board rehearsal's stand-in):
    its children running ``python -m rkort.toolkit.child serve``, found in the process table
    (rkort keeps its runners private). A benchmark holding one session sees that session's
    contexts, one worker each on a host."""
    import psutil

    from rkort.toolkit.protocol import CHILD_MODULE

    found = []
    for child in psutil.Process().children():
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if CHILD_MODULE in argv and "serve" in argv:
            found.append(child.pid)
    return found


def memory_now() -> dict[str, Any]:
    """This process's peak and current RSS, and each simulator worker's (see
    :func:`simulator_workers`); ``worker_peak``/``worker_rss`` are their sums (None: no worker)."""
    workers = []
    for pid in simulator_workers():
        try:
            workers.append({"pid": pid, "peak": peak_rss(pid), "rss": rss(pid)})
        except Exception:  # noqa: BLE001 - it exited meanwhile
            continue
    return {
        "peak": peak_rss(),
        "rss": rss(),
        "workers": workers,
        "worker_peak": sum(w["peak"] for w in workers) if workers else None,
        "worker_rss": sum(w["rss"] for w in workers) if workers else None,
    }


def measure_alone(
    load: Callable[[], Any],
    open_session: Callable[[Any], tuple[Callable[[], Any], dict[str, Any]]],
    calls: int,
) -> dict[str, Any]:
    """The memory child: one configuration alone in this fresh process. ``load()`` imports the
    runtime (timed as ``import``), ``open_session(loaded)`` opens it (timed as ``session``) and
    returns the call to repeat and what else to report (``info``); after ``calls`` calls, the
    figures of :func:`memory_now`. The caller keeps nothing else alive: import only numpy
    before."""
    t0 = time.perf_counter()
    loaded = load()
    t1 = time.perf_counter()
    call, info = open_session(loaded)
    t2 = time.perf_counter()
    for _ in range(calls):
        call()
    return {"import": t1 - t0, "session": t2 - t1, "info": info, **memory_now()}


@contextlib.contextmanager
def quiet_fds(log_path: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Send fd 1 and 2 (Python and C output alike) to a log file, or /dev/null, for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    target = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    saved = (os.dup(1), os.dup(2))
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def compiled_env(prefix: Path) -> dict[str, str]:
    """This environment, with rkort's (an editable install's) and the benchmarks' modules
    byte-compiled into ``prefix`` for children to import, as from an installed wheel (pip
    compiles a wheel's modules; an editable checkout under PYTHONDONTWRITEBYTECODE would
    compile every module from source in each fresh process)."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(prefix)}
    repo = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "rkort", "tests", "benchmarks"],
        cwd=repo,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return env


def run_child(
    script: Path,
    kind: str,
    log_path: Path,
    timeout: float = 900,
    env: Mapping[str, str] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Run ``python script --child KIND --params JSON --out FILE`` (see :func:`main`) with its
    console output in ``log_path`` and return the JSON it wrote, with ``_others_cpu`` added
    (other work's CPU share meanwhile). ``params`` are JSON data, :class:`Model` objects
    included; ``env`` replaces the environment. Used for parts that load rknn-toolkit2 (its
    output is noise) or need a fresh process."""
    with tempfile.TemporaryDirectory(prefix="rkort-bench-child-") as tmp:
        out = Path(tmp) / "result.json"
        start = _cpu_now()
        argv = [
            "--child",
            kind,
            "--params",
            json.dumps(params, default=_to_json),
            "--out",
            str(out),
        ]
        with open(log_path, "ab") as logf:
            proc = subprocess.run(
                [sys.executable, str(script), *argv],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=tmp,  # the toolkit may drop files into its working directory
                env=None if env is None else dict(env),
                timeout=timeout,
                check=False,
            )
        if proc.returncode != 0 or not out.exists():
            tail = Path(log_path).read_text(errors="replace").splitlines()[-25:]
            raise RuntimeError(
                f"benchmark child {script.name} {kind} failed (exit {proc.returncode}); "
                f"last lines of {log_path}:\n" + "\n".join(tail)
            )
        result = json.loads(out.read_text())
        if isinstance(result, dict):
            # CPU that other work used meanwhile (the child and its descendants are reaped).
            result["_others_cpu"] = others_cpu_since(start)
        return result


def main(parent: Callable[[], Any], children: Mapping[str, Callable[..., Any]]) -> None:
    """A benchmark script's entry point: ``parent()``, or in a child started by
    :func:`run_child`, ``children[KIND](**params)``, whose JSON result is written for the
    parent; the child then exits at once (the toolkit's native threads can hang at exit)."""
    if len(sys.argv) < 2 or sys.argv[1] != "--child":
        sys.exit(parent())
    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True, choices=sorted(children))
    p.add_argument("--params", default="{}")
    p.add_argument("--out", required=True)
    a = p.parse_args(sys.argv[1:])
    result = children[a.child](**json.loads(a.params, object_hook=_from_json))
    write_json(a.out, result)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _to_json(value: Any) -> Any:
    if isinstance(value, Model):
        return {"__model__": value.as_json()}
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON data")


def _from_json(obj: dict[str, Any]) -> Any:
    return Model.from_json(obj["__model__"]) if set(obj) == {"__model__"} else obj


def private_default_cache(tmp: Path) -> None:
    """Point $RKORT_CACHE_DIR (inherited by every child) at a private temporary directory, so
    nothing here can touch the user's cache even where no cache_dir is passed explicitly."""
    os.environ["RKORT_CACHE_DIR"] = str(Path(tmp) / "default-cache")


def write_json(path: str, data: Any) -> None:
    Path(path).write_text(json.dumps(data))


def toolkit_data_formats(shapes: Sequence[Sequence[int]]) -> list[str]:
    """What rkort's worker passes to inference(): 4-D ONNX inputs are NCHW."""
    return ["nchw" if len(s) == 4 else "nhwc" for s in shapes]


# ---------------------------------------------------------------------------------------------
# Models (built locally, deterministic)


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    inputs: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    outputs: tuple[str, ...]

    def feed(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for name, (shape, dtype) in self.inputs.items():
            if name == "input_ids":
                out[name] = rng.integers(1, 30000, size=shape, dtype=np.int64)
            elif name == "attention_mask":
                out[name] = np.ones(shape, dtype=np.int64)
            else:
                out[name] = rng.standard_normal(shape).astype(dtype)
        return out

    @property
    def size(self) -> int:
        # Remembered on first read: reports are written after the models' directory is gone.
        if "_size" not in self.__dict__:
            self.__dict__["_size"] = self.path.stat().st_size
        return int(self.__dict__["_size"])

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "inputs": {k: [list(shape), dt] for k, (shape, dt) in self.inputs.items()},
            "outputs": list(self.outputs),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Model:
        inputs = {k: (tuple(shape), dt) for k, (shape, dt) in d["inputs"].items()}
        return cls(d["name"], Path(d["path"]), inputs, tuple(d["outputs"]))


def models_dir(default: Path) -> Path:
    d = Path(os.environ.get(MODELS_ENV) or default)
    d.mkdir(parents=True, exist_ok=True)
    return d


def mlp(directory: Path) -> Model:
    """x[1, 256] float32 -> Gemm 256x512 -> Relu -> Gemm 512x256 -> Relu -> Gemm 256x16 (~1 MB)."""
    path = directory / "mlp.onnx"
    info = Model("MLP", path, {"x": ((1, 256), "float32")}, ("y",))
    if path.exists():
        info.size  # noqa: B018 - remembered while the file exists
        return info
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dims = [256, 512, 256, 16]
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"),
        ]
        last = i == len(dims) - 2
        out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out if last else f"g{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    _atomic_save(lambda p: onnx.save(model, str(p)), path)
    info.size  # noqa: B018 - remembered while the file exists
    return info


def bert(
    directory: Path,
    hidden: int = 256,
    layers: int = 4,
    name: str | None = None,
    dynamic: bool = False,
) -> Model:
    """A BERT encoder with random weights (transformers BertModel), exported at batch 1, seq 128,
    returning last_hidden_state only. hidden 256 / 4 layers is "BERT-like" (~30 MB); hidden 768 /
    12 layers is BERT-base sized (~420 MB). ``dynamic``: batch and sequence axes dynamic (named
    batch_size and sequence_length, as optimum names them); the feed stays 1 x 128."""
    name = name or f"bert_h{hidden}_l{layers}" + ("_dyn" if dynamic else "")
    path = directory / f"{name}.onnx"
    info = Model(
        f"BERT-like h{hidden} L{layers}" + (" (dynamic axes)" if dynamic else ""),
        path,
        {"input_ids": ((1, SEQ), "int64"), "attention_mask": ((1, SEQ), "int64")},
        ("last_hidden_state",),
    )
    if path.exists():
        info.size  # noqa: B018 - remembered while the file exists
        return info
    log(f"exporting {path.name} with torch.onnx.export (random weights) ...")
    # transformers and torch.onnx print warnings: export in a child with its output in a log.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import _common; "
        "_common._export_bert(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == '1')"
    )
    with open(directory / f"{name}.export.log", "wb") as logf:
        subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                str(HERE),
                str(path),
                str(hidden),
                str(layers),
                "1" if dynamic else "0",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            check=True,
        )
    info.size  # noqa: B018 - remembered while the file exists
    return info


def _export_bert(path: str, hidden: int, layers: int, dynamic: bool = False) -> None:
    import inspect

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=hidden * 4,
        vocab_size=30522,
        max_position_embeddings=512,
    )
    model = BertModel(config, add_pooling_layer=False).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(1, 30000, (1, SEQ), dtype=torch.int64)
    mask = torch.ones((1, SEQ), dtype=torch.int64)
    kwargs: dict[str, Any] = {
        "input_names": ["input_ids", "attention_mask"],
        "output_names": ["last_hidden_state"],
        "opset_version": OPSET,
        "do_constant_folding": True,
    }
    if dynamic:
        axes = {0: "batch_size", 1: "sequence_length"}
        kwargs["dynamic_axes"] = {
            "input_ids": axes,
            "attention_mask": axes,
            "last_hidden_state": axes,
        }
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    tmp = Path(path).with_suffix(".onnx.part")
    with torch.no_grad():
        torch.onnx.export(LastHidden(model), (ids, mask), str(tmp), **kwargs)
    os.replace(tmp, path)


def _atomic_save(save: Callable[[Path], None], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    save(tmp)
    os.replace(tmp, path)
